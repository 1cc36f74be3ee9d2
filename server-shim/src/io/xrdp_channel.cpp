#include "io/xrdp_channel.hpp"

#include <dlfcn.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>

#include <fmt/format.h>

#include "cardbridge/support/log.hpp"

namespace cardbridge::shim {

namespace {

std::shared_ptr<spdlog::logger> logger() {
  static auto l = log::get("cardbridge.shim.xrdp");
  return l;
}

// libxrdpapi 0.9 (xrdpapi.h): returns 1 on success, 0 on error; handles are opaque.
using OpenEx = void* (*)(unsigned int session, const char* name, unsigned int flags);
using Close = int (*)(void* handle);
using Query = int (*)(void* handle, int klass, void** buffer, unsigned int* returned);
using FreeMemory = void (*)(void* memory);
constexpr unsigned int kCurrentSession = 0xFFFFFFFF;
constexpr unsigned int kDynamic = 0x00000001;
constexpr int kVirtualFileHandle = 1;

struct Api {
  void* lib = nullptr;
  OpenEx open = nullptr;
  Close close = nullptr;
  Query query = nullptr;
  FreeMemory free_memory = nullptr;
  std::string error;
};

const Api& load(const std::string& path) {
  static std::mutex m;
  static Api api;
  static bool tried = false;
  std::lock_guard lock(m);
  if (tried) return api;
  tried = true;
  std::vector<std::string> candidates;
  if (!path.empty()) candidates.push_back(path);
  candidates.insert(candidates.end(), {"libxrdpapi.so.0", "/usr/lib/x86_64-linux-gnu/xrdp/libxrdpapi.so.0",
                                       "/usr/lib/xrdp/libxrdpapi.so.0", "/usr/local/lib/xrdp/libxrdpapi.so.0"});
  for (const auto& c : candidates) {
    api.lib = ::dlopen(c.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (api.lib) break;
  }
  if (!api.lib) {
    api.error = "libxrdpapi.so.0 not found (is xrdp installed?)";
    return api;
  }
  api.open = reinterpret_cast<OpenEx>(::dlsym(api.lib, "WTSVirtualChannelOpenEx"));
  api.close = reinterpret_cast<Close>(::dlsym(api.lib, "WTSVirtualChannelClose"));
  api.query = reinterpret_cast<Query>(::dlsym(api.lib, "WTSVirtualChannelQuery"));
  api.free_memory = reinterpret_cast<FreeMemory>(::dlsym(api.lib, "WTSFreeMemory"));
  if (!api.open || !api.close || !api.query || !api.free_memory) api.error = "libxrdpapi lacks the WTS functions";
  return api;
}

std::optional<int> display_number() {
  const char* d = std::getenv("DISPLAY");
  if (!d) return std::nullopt;
  const char* colon = std::strrchr(d, ':');
  if (!colon) return std::nullopt;
  char* end = nullptr;
  long n = std::strtol(colon + 1, &end, 10);
  if (end == colon + 1 || n < 0) return std::nullopt;
  return static_cast<int>(n);
}

constexpr const char* kSockDirs[] = {"/run/xrdp/sockdir", "/var/run/xrdp/sockdir", "/tmp/.xrdp"};

// chansrv's listening socket for our display, in the directory that has our xrdpapi socket.
std::optional<std::string> chansrv_listen_path() {
  auto n = display_number();
  if (!n) return std::nullopt;
  struct stat st {};
  for (const char* dir : kSockDirs) {
    if (::stat(fmt::format("{}/xrdpapi_{}", dir, *n).c_str(), &st) == 0) {
      return fmt::format("{}/xrdp_chansrv_socket_{}", dir, *n);
    }
  }
  return std::nullopt;
}

bool client_attached() {
  auto p = chansrv_listen_path();
  struct stat st {};
  return !p || ::stat(p->c_str(), &st) != 0;
}

constexpr std::chrono::milliseconds kAttachPoll{200};

}  // namespace

bool in_xrdp_session() {
  auto n = display_number();
  if (!n) return false;
  struct stat st {};
  for (const char* dir : kSockDirs) {
    if (::stat(fmt::format("{}/xrdpapi_{}", dir, *n).c_str(), &st) == 0) return true;
  }
  return std::getenv("XRDP_SESSION") != nullptr;
}

std::string xrdp_client_gone() {
  return client_attached() ? std::string() : std::string("the RDP client left the xrdp session");
}

namespace {

// Calls |then| once an RDP client is attached (at once if one is), polling every kAttachPoll.
void when_attached(boost::asio::io_context& io, std::function<void()> then) {
  if (client_attached()) return then();
  logger()->debug("no RDP client attached to the xrdp session; waiting");
  auto timer = std::make_shared<boost::asio::steady_timer>(io);
  auto poll = std::make_shared<std::function<void()>>();
  *poll = [timer, poll, then = std::move(then)] {
    timer->expires_after(kAttachPoll);
    timer->async_wait([timer, poll, then](boost::system::error_code ec) {
      if (ec) return;
      if (client_attached()) {
        logger()->debug("an RDP client attached to the xrdp session");
        *poll = nullptr;  // breaks the cycle
        then();
        return;
      }
      (*poll)();
    });
  };
  (*poll)();
}

}  // namespace

Connector xrdp_connector(boost::asio::io_context& io, XrdpOptions options) {
  return [&io, options](auto done) { when_attached(io, [&io, options, done] {
    const Api& api = load(options.library);
    if (!api.error.empty()) return done(nullptr, api.error);
    void* h = api.open(kCurrentSession, options.channel.c_str(), options.dynamic ? kDynamic : 0);
    if (!h) return done(nullptr, "xrdp refused to open the channel (no session channel server, or channel not allowed)");
    void* buf = nullptr;
    unsigned int n = 0;
    int fd = -1;
    if (api.query(h, kVirtualFileHandle, &buf, &n) == 1 && buf && n == sizeof(int)) {
      std::memcpy(&fd, buf, sizeof fd);
    }
    if (buf) api.free_memory(buf);
    const int mine = fd >= 0 ? ::dup(fd) : -1;
    api.close(h);
    if (mine < 0) return done(nullptr, "libxrdpapi did not hand out the channel socket");
    transport::GenericSocket sock(io);
    boost::system::error_code ec;
    sock.assign(boost::asio::generic::stream_protocol(AF_UNIX, 0), mine, ec);
    if (ec) {
      ::close(mine);
      return done(nullptr, ec.message());
    }
    logger()->info("xrdp {} channel {} open", options.dynamic ? "dynamic" : "static", options.channel);
    done(std::make_shared<transport::ByteStream>(std::move(sock)), "");
  }); };
}

}  // namespace cardbridge::shim
