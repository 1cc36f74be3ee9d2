#include "cardbridge/session/discovery.hpp"

#include <pwd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iterator>

#include <fmt/format.h>

namespace cardbridge::session {

namespace {

std::vector<std::string> nul_separated(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::string all((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  std::vector<std::string> out;
  std::size_t start = 0;
  while (start < all.size()) {
    auto end = all.find('\0', start);
    if (end == std::string::npos) end = all.size();
    out.push_back(all.substr(start, end - start));
    start = end + 1;
  }
  return out;
}

std::optional<std::string> env_value(const std::vector<std::string>& environ, const std::string& key) {
  const std::string prefix = key + "=";
  for (const auto& e : environ) {
    if (e.starts_with(prefix)) return e.substr(prefix.size());
  }
  return std::nullopt;
}

std::string login_of(unsigned uid) {
  passwd pw{};
  passwd* found = nullptr;
  char buf[4096];
  if (::getpwuid_r(static_cast<uid_t>(uid), &pw, buf, sizeof buf, &found) != 0 || !found) return {};
  return found->pw_name;
}

}  // namespace

ShimArgs parse_shim_args(const std::vector<std::string>& argv, const std::vector<std::string>& environ, unsigned uid) {
  ShimArgs a;
  for (std::size_t i = 1; i < argv.size(); ++i) {
    auto take = [&](const std::string& name, std::string& out) {
      if (argv[i] == name && i + 1 < argv.size()) {
        out = argv[++i];
        return true;
      }
      if (argv[i].starts_with(name + "=")) {
        out = argv[i].substr(name.size() + 1);
        return true;
      }
      return false;
    };
    if (take("--socket", a.socket) || take("--control", a.control)) continue;
  }
  if (a.socket.empty()) {  // the shim's own default (server-shim/app/main.cpp)
    auto rt = env_value(environ, "XDG_RUNTIME_DIR");
    a.socket = (rt && !rt->empty() ? *rt : fmt::format("/run/user/{}", uid)) + "/cardbridge/pcscd.comm";
  }
  if (a.control.empty()) a.control = a.socket + ".ctl";
  if (auto s = env_value(environ, "CARDBRIDGE_SESSION"); s && !s->empty()) {
    a.session = *s;
  } else {
    a.session = std::filesystem::path(a.socket).parent_path().filename().string();
  }
  return a;
}

std::vector<RunningShim> find_shims(const std::string& proc) {
  std::vector<RunningShim> out;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(proc, ec)) {
    const std::string pid_text = entry.path().filename().string();
    if (pid_text.empty() || !std::all_of(pid_text.begin(), pid_text.end(), ::isdigit)) continue;
    std::error_code e2;
    auto exe = std::filesystem::read_symlink(entry.path() / "exe", e2).filename().string();
    if (e2) continue;  // another user's process (not root), or a kernel thread
    if (exe.ends_with(" (deleted)")) exe.resize(exe.size() - 10);  // the package was upgraded under it
    if (exe != "cardbridge-shim") continue;
    struct stat st {};
    if (::stat(entry.path().c_str(), &st) != 0) continue;
    const auto argv = nul_separated((entry.path() / "cmdline").string());
    const auto environ = nul_separated((entry.path() / "environ").string());
    const auto args = parse_shim_args(argv, environ, st.st_uid);
    RunningShim s;
    s.pid = std::stoi(pid_text);
    s.uid = st.st_uid;
    s.user = login_of(st.st_uid);
    s.session = args.session;
    s.socket = args.socket;
    s.control = args.control;
    out.push_back(std::move(s));
  }
  std::sort(out.begin(), out.end(), [](const RunningShim& a, const RunningShim& b) {
    return std::tie(a.user, a.uid, a.session, a.pid) < std::tie(b.user, b.uid, b.session, b.pid);
  });
  return out;
}

ProgramsView programs_of(unsigned uid, const std::string& socket, const std::string& proc) {
  ProgramsView v;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(proc, ec)) {
    const std::string pid_text = entry.path().filename().string();
    if (pid_text.empty() || !std::all_of(pid_text.begin(), pid_text.end(), ::isdigit)) continue;
    struct stat st {};
    if (::stat(entry.path().c_str(), &st) != 0 || st.st_uid != uid) continue;
    std::ifstream probe(entry.path() / "environ");
    if (!probe) continue;
    const auto environ = nul_separated((entry.path() / "environ").string());
    if (environ.empty()) continue;  // kernel threads, zombies
    ++v.examined;
    if (env_value(environ, "PCSCLITE_CSOCK_NAME") == socket) ++v.with_socket;
    if (auto e = env_value(environ, "CARDBRIDGE_START_ERROR"); e && !e->empty()) {
      if (std::find(v.start_errors.begin(), v.start_errors.end(), *e) == v.start_errors.end())
        v.start_errors.push_back(*e);
    }
  }
  return v;
}

std::optional<unsigned> uid_of(const std::string& name) {
  passwd pw{};
  passwd* found = nullptr;
  char buf[4096];
  if (::getpwnam_r(name.c_str(), &pw, buf, sizeof buf, &found) != 0 || !found) return std::nullopt;
  return static_cast<unsigned>(found->pw_uid);
}

}  // namespace cardbridge::session
