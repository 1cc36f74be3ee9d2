#include "cardbridge/session/supervisor.hpp"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <thread>

#include "cardbridge/journal/journal.hpp"
#include "cardbridge/support/log.hpp"

namespace cardbridge::session {

namespace {

log::Channel logger{"cdrsession"};

volatile sig_atomic_t g_stop = 0;
void on_signal(int) { g_stop = 1; }

int pidfd_open(int pid) { return static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)); }

// In a child: the session's environment, then the shim with its options (and |extra|, if any).
[[noreturn]] void exec_shim(const SupervisorOptions& o, const char* extra) {
  for (const auto& [k, v] : o.env) ::setenv(k.c_str(), v.c_str(), 1);
  std::vector<char*> argv;
  argv.push_back(const_cast<char*>(o.shim.c_str()));
  for (const auto& a : o.shim_args) argv.push_back(const_cast<char*>(a.c_str()));
  if (extra) argv.push_back(const_cast<char*>(extra));
  argv.push_back(nullptr);
  ::execv(o.shim.c_str(), argv.data());
  std::fprintf(stderr, "cdrsession: cannot run %s: %s\n", o.shim.c_str(), std::strerror(errno));
  ::_exit(127);
}

pid_t spawn(const SupervisorOptions& o) {
  pid_t pid = ::fork();
  if (pid != 0) return pid;
  // child
  ::setpgid(0, 0);
  sigset_t none;
  sigemptyset(&none);
  ::sigprocmask(SIG_SETMASK, &none, nullptr);
  if (o.journal_fd >= 0) {
    ::dup2(o.journal_fd, 2);
    ::setenv("JOURNAL_STREAM", journal::stream_variable(2).c_str(), 1);
  } else if (!o.log_file.empty()) {
    int fd = ::open(o.log_file.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    if (fd >= 0) ::dup2(fd, 2);
    ::unsetenv("JOURNAL_STREAM");  // stderr is that file now, whatever the parent's was
  }
  exec_shim(o, nullptr);
}

}  // namespace

std::string check_shim_options(const SupervisorOptions& o) {
  int out[2];
  if (::pipe2(out, O_CLOEXEC) != 0) return std::string("cannot check the shim's options: ") + std::strerror(errno);
  pid_t pid = ::fork();
  if (pid < 0) {
    ::close(out[0]);
    ::close(out[1]);
    return "cannot check the shim's options: fork failed";
  }
  if (pid == 0) {
    ::dup2(out[1], 1);
    ::dup2(out[1], 2);
    int null = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (null >= 0) ::dup2(null, 0);
    ::unsetenv("JOURNAL_STREAM");
    exec_shim(o, "--check-config");
  }
  ::close(out[1]);
  std::string said;
  char buf[512];
  for (;;) {
    ssize_t n = ::read(out[0], buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    if (said.size() < 4096) said.append(buf, static_cast<std::size_t>(n));
  }
  ::close(out[0]);
  int st = 0;
  while (::waitpid(pid, &st, 0) < 0 && errno == EINTR) {
  }
  if (WIFEXITED(st) && WEXITSTATUS(st) == 0) return {};
  // CLI11 adds "Run with --help for more information.": not advice for an admin reading a log.
  std::string why;
  std::size_t start = 0;
  while (start < said.size()) {
    auto end = said.find('\n', start);
    std::string line = said.substr(start, end == std::string::npos ? std::string::npos : end - start);
    start = end == std::string::npos ? said.size() : end + 1;
    if (line.empty() || line.starts_with("Run with --help")) continue;
    why += (why.empty() ? "" : "; ") + line;
  }
  if (why.empty()) {
    why = WIFEXITED(st) ? "it exited with status " + std::to_string(WEXITSTATUS(st)) : "it was killed by a signal";
  }
  if (why.size() > 300) why = why.substr(0, 297) + "...";
  return "the shim refuses its options: " + why;
}

std::string find_shim() {
  std::error_code ec;
  auto self = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    for (auto candidate : {self.parent_path() / "cardbridge-shim",
                           self.parent_path().parent_path() / "server-shim" / "cardbridge-shim"}) {
      if (::access(candidate.c_str(), X_OK) == 0) return candidate.string();
    }
  }
  if (const char* path = std::getenv("PATH")) {
    std::string p = path;
    std::size_t start = 0;
    while (start <= p.size()) {
      auto end = p.find(':', start);
      auto dir = p.substr(start, end == std::string::npos ? std::string::npos : end - start);
      auto candidate = std::filesystem::path(dir.empty() ? "." : dir) / "cardbridge-shim";
      if (::access(candidate.c_str(), X_OK) == 0) return candidate.string();
      if (end == std::string::npos) break;
      start = end + 1;
    }
  }
  return "cardbridge-shim";
}

int run_supervisor(const SessionPaths& paths, const SupervisorOptions& o) {
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  ::sigaction(SIGTERM, &sa, nullptr);
  ::sigaction(SIGINT, &sa, nullptr);
  ::sigaction(SIGHUP, &sa, nullptr);
  ::signal(SIGPIPE, SIG_IGN);

  {
    std::ofstream pid_file(paths.pid_file, std::ios::trunc);
    pid_file << ::getpid() << "\n";
  }
  int leader_fd = o.until_pid > 0 ? pidfd_open(o.until_pid) : -1;
  if (o.until_pid > 0 && leader_fd < 0) {
    logger->error("session leader pid {} is not running; not starting", o.until_pid);
    ::unlink(paths.pid_file.c_str());
    return 1;
  }
  auto backoff = std::chrono::milliseconds(200);
  int rc = 0;
  while (!g_stop) {
    const auto started = std::chrono::steady_clock::now();
    pid_t child = spawn(o);
    if (child < 0) {
      logger->error("fork failed: {}", std::strerror(errno));
      rc = 1;
      break;
    }
    logger->info("shim started (pid {}) for session '{}'", child, paths.key);
    bool leader_gone = false;
    int status = 0;
    for (;;) {
      if (g_stop) break;
      pid_t w = ::waitpid(child, &status, WNOHANG);
      if (w == child) break;
      if (leader_fd >= 0) {
        pollfd p{leader_fd, POLLIN, 0};
        if (::poll(&p, 1, 200) > 0) {
          leader_gone = true;
          break;
        }
      } else {
        std::this_thread::sleep_for(std::chrono::milliseconds(200));
      }
    }
    if (g_stop || leader_gone) {
      logger->info("session '{}' {}: stopping the shim", paths.key, leader_gone ? "ended" : "stopping");
      ::kill(child, SIGTERM);
      for (int i = 0; i < 50 && ::waitpid(child, &status, WNOHANG) == 0; ++i)
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      if (::waitpid(child, &status, WNOHANG) == 0) {
        ::kill(child, SIGKILL);
        ::waitpid(child, &status, 0);
      }
      break;
    }
    logger->warn("shim exited ({}); restarting", WIFEXITED(status) ? fmt::format("status {}", WEXITSTATUS(status))
                                                                     : fmt::format("signal {}", WTERMSIG(status)));
    if (std::chrono::steady_clock::now() - started > std::chrono::seconds(10)) backoff = std::chrono::milliseconds(200);
    std::this_thread::sleep_for(backoff);
    backoff = std::min(backoff * 2, std::chrono::milliseconds(5000));
  }
  if (leader_fd >= 0) ::close(leader_fd);
  ::unlink(paths.pid_file.c_str());
  return rc;
}

}  // namespace cardbridge::session
