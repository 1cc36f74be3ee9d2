#include "cardbridge/shim_io/xrdp_channel.hpp"

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <set>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "cardbridge/support/log.hpp"

namespace cardbridge::shim {

namespace {

log::Channel logger{"cardbridge.shim.xrdp"};

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

enum class Entry { kMissing, kTrusted, kUntrusted };

// <dir>/<name>, checked (xrdp_socket_trusted); an untrusted one is logged once per path.
Entry sockdir_entry(const char* dir, const std::string& name) {
  const auto path = fmt::format("{}/{}", dir, name);
  struct stat d {}, e {};
  if (::lstat(path.c_str(), &e) != 0) return Entry::kMissing;
  if (::lstat(dir, &d) == 0 && xrdp_socket_trusted(d, e, ::geteuid())) return Entry::kTrusted;
  static std::mutex mu;
  static std::set<std::string> warned;
  std::lock_guard lock(mu);
  if (warned.insert(path).second) {
    logger->warn("ignoring {} (owner uid {}, mode {:o}; directory owner uid {}, mode {:o}): not chansrv's for this "
                 "session",
                 path, e.st_uid, e.st_mode & 07777, d.st_uid, d.st_mode & 07777);
  }
  return Entry::kUntrusted;
}

// The socket directory that has our display's trusted xrdpapi socket.
const char* sockdir() {
  auto n = display_number();
  if (!n) return nullptr;
  for (const char* dir : kSockDirs) {
    if (sockdir_entry(dir, fmt::format("xrdpapi_{}", *n)) == Entry::kTrusted) return dir;
  }
  return nullptr;
}

// chansrv's channel API socket for our display, <sockdir>/xrdpapi_<display>.
std::optional<std::string> api_socket_path() {
  auto n = display_number();
  const char* dir = sockdir();
  if (!n || !dir) return std::nullopt;
  auto path = fmt::format("{}/xrdpapi_{}", dir, *n);
  struct stat st {};
  if (::lstat(path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) return path;
  return std::nullopt;
}

// chansrv listens for an RDP client's channels only while none is attached: the file's
// absence means a client is there (another user's file there is ignored).
bool client_attached() {
  auto n = display_number();
  const char* dir = sockdir();
  if (!n || !dir) return true;
  return sockdir_entry(dir, fmt::format("xrdp_chansrv_socket_{}", *n)) != Entry::kTrusted;
}

constexpr std::chrono::milliseconds kAttachPoll{200};
constexpr uint32_t kDynamic = 0x00000001;  // WTS_CHANNEL_OPTION_DYNAMIC

}  // namespace

bool xrdp_socket_trusted(const struct stat& dir, const struct stat& entry, uid_t me) {
  if (!S_ISDIR(dir.st_mode) || (dir.st_uid != 0 && dir.st_uid != me)) return false;
  if ((dir.st_mode & (S_IWGRP | S_IWOTH)) != 0 && (dir.st_mode & S_ISVTX) == 0) return false;
  if (S_ISLNK(entry.st_mode)) return false;
  return entry.st_uid == me || entry.st_uid == 0;
}

bool in_xrdp_session() {
  if (sockdir() != nullptr) return true;
  return std::getenv("XRDP_SESSION") != nullptr;
}

std::string xrdp_client_gone() {
  return client_attached() ? std::string() : std::string("the RDP client left the xrdp session");
}

namespace {

// Calls |then| once an RDP client is attached (at once if one is), polling every kAttachPoll.
void when_attached(boost::asio::io_context& io, std::function<void()> then) {
  if (client_attached()) return then();
  logger->info("no RDP client attached to the xrdp session; waiting");
  auto timer = std::make_shared<boost::asio::steady_timer>(io);
  auto poll = std::make_shared<std::function<void()>>();
  *poll = [timer, poll, then = std::move(then)] {
    timer->expires_after(kAttachPoll);
    timer->async_wait([timer, poll, then](boost::system::error_code ec) {
      if (ec) return;
      if (client_attached()) {
        logger->debug("an RDP client attached to the xrdp session");
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

namespace {

// Opening a channel, as xrdp 0.9's chansrv expects it from a session program (what libxrdpapi's
// WTSVirtualChannelOpenEx does; we do it ourselves, asynchronously: the library blocks the calling
// thread -- up to the client's answer for a dynamic channel -- and, when a dynamic channel is
// refused, leaks its socket, which chansrv then keeps in its table, where its channel id can
// shadow the static channel's for later connections):
//   connect to <sockdir>/xrdpapi_<display>;
//   send, little-endian: u32 total length (16 + name length), u32 0, u32 name length, the name,
//        u32 flags (0: static, 1: dynamic);
//   read a u32 status: 0 = open (for a dynamic channel: once the client accepted it);
//   from then on the socket carries the channel's bytes both ways.
constexpr std::chrono::seconds kOpenGuard{15};  // hang guard for a client that never answers

using Opened = std::function<void(std::shared_ptr<transport::ByteStream>, std::string)>;

void put_u32(std::vector<uint8_t>& out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<uint8_t>(v >> (8 * i)));
}

void async_open(boost::asio::io_context& io, const std::string& api_path, const std::string& name, bool dynamic,
                Opened done) {
  struct Op {
    transport::GenericSocket sock;
    boost::asio::steady_timer guard;
    std::vector<uint8_t> request;
    std::array<uint8_t, 4> status{};
    Opened done;
    bool finished = false;
    Op(boost::asio::io_context& c, Opened d) : sock(c), guard(c), done(std::move(d)) {}
    void finish(std::shared_ptr<transport::ByteStream> s, std::string err) {
      if (finished) return;
      finished = true;
      guard.cancel();
      if (!s) {
        boost::system::error_code ignored;
        sock.close(ignored);
      }
      auto d = std::move(done);
      d(std::move(s), std::move(err));
    }
  };
  auto op = std::make_shared<Op>(io, std::move(done));
  put_u32(op->request, static_cast<uint32_t>(16 + name.size()));
  put_u32(op->request, 0);
  put_u32(op->request, static_cast<uint32_t>(name.size()));
  op->request.insert(op->request.end(), name.begin(), name.end());
  put_u32(op->request, dynamic ? kDynamic : 0u);
  op->guard.expires_after(kOpenGuard);
  op->guard.async_wait([op](boost::system::error_code ec) {
    if (!ec) op->finish(nullptr, "no answer from xrdp's channel server");
  });
  boost::system::error_code ec;
  op->sock.open(boost::asio::generic::stream_protocol(AF_UNIX, 0), ec);
  if (ec) return op->finish(nullptr, ec.message());
  boost::asio::local::stream_protocol::endpoint ep(api_path);
  op->sock.async_connect(boost::asio::generic::stream_protocol::endpoint(ep.data(), ep.size()),
                         [op](boost::system::error_code cec) {
    if (cec) return op->finish(nullptr, "cannot reach xrdp's channel server: " + cec.message());
    boost::asio::async_write(op->sock, boost::asio::buffer(op->request), [op](boost::system::error_code wec, std::size_t) {
      if (wec) return op->finish(nullptr, "xrdp's channel server: " + wec.message());
      boost::asio::async_read(op->sock, boost::asio::buffer(op->status), [op](boost::system::error_code rec, std::size_t) {
        if (rec) return op->finish(nullptr, "xrdp's channel server closed the request (" + rec.message() + ")");
        const uint32_t status = static_cast<uint32_t>(op->status[0]) | static_cast<uint32_t>(op->status[1]) << 8 |
                                static_cast<uint32_t>(op->status[2]) << 16 | static_cast<uint32_t>(op->status[3]) << 24;
        if (status != 0) {
          return op->finish(nullptr, fmt::format("refused (status {:#x}: channel not offered by the client, or not "
                                                 "allowed in xrdp.ini)", status));
        }
        op->finish(std::make_shared<transport::ByteStream>(std::move(op->sock)), "");
      });
    });
  });
}

// One channel in the race: reads (and keeps) what the desk says before the race is decided,
// then, handed to the desk link as its stream, replays those bytes and passes everything on.
class RacingChannel final : public transport::Stream, public std::enable_shared_from_this<RacingChannel> {
 public:
  RacingChannel(boost::asio::io_context& io, std::shared_ptr<transport::ByteStream> inner, bool dynamic)
      : io_(io), inner_(std::move(inner)), dynamic_(dynamic) {}

  bool dynamic() const { return dynamic_; }

  // Starts reading; |spoke| runs at the first bytes, |lost| if the channel closes before start().
  void listen(std::function<void(RacingChannel&)> spoke, std::function<void(RacingChannel&, const std::string&)> lost) {
    spoke_ = std::move(spoke);
    lost_ = std::move(lost);
    std::weak_ptr<RacingChannel> weak = shared_from_this();
    inner_->start(
        [weak](std::span<const uint8_t> data) {
          auto self = weak.lock();
          if (!self) return;
          if (self->started_) {
            if (self->on_data_) self->on_data_(data);
            return;
          }
          const bool first = self->early_.empty();
          self->early_.insert(self->early_.end(), data.begin(), data.end());
          if (auto cb = self->spoke_; first && cb) cb(*self);  // a copy: it may reset spoke_
        },
        [weak](const std::string& reason) {
          auto self = weak.lock();
          if (!self) return;
          if (self->started_) {
            if (self->on_close_) self->on_close_(reason);
            return;
          }
          self->early_close_ = reason;
          if (auto cb = self->lost_) cb(*self, reason);  // a copy: it may drop this channel
        });
  }

  void start(DataHandler on_data, CloseHandler on_close) override {
    on_data_ = std::move(on_data);
    on_close_ = std::move(on_close);
    spoke_ = nullptr;
    lost_ = nullptr;
    started_ = true;
    // The owner is told "up" right after start(): replay afterwards, as a read would.
    boost::asio::post(io_, [self = shared_from_this()] {
      if (self->closed_) return;
      auto early = std::move(self->early_);
      self->early_.clear();
      if (!early.empty() && self->on_data_) self->on_data_(early);
      if (self->early_close_ && self->on_close_ && !self->closed_) self->on_close_(*self->early_close_);
    });
  }
  void send(std::vector<uint8_t> bytes) override { inner_->send(std::move(bytes)); }
  void close(const std::string& reason) override {
    closed_ = true;
    inner_->close(reason);
    release();
  }
  void close_after_flush(const std::string& reason) override { inner_->close_after_flush(reason); }
  bool is_open() const override { return !closed_ && inner_->is_open(); }
  std::size_t queued_bytes() const override { return inner_->queued_bytes(); }
  // The channel's socket leads to this session's chansrv, which runs as the session's user
  // (or root): anything else is not xrdp, and shows as the foreign UNIX peer it is.
  PeerIdentity peer() const override {
    auto inner = inner_->peer();
    if (inner.kind == PeerIdentity::Kind::kUnixUser && (inner.uid == ::geteuid() || inner.uid == 0))
      return PeerIdentity::rdp_channel(dynamic_ ? "xrdp dynamic" : "xrdp static");
    return inner;
  }

 private:
  void release() {
    spoke_ = nullptr;
    lost_ = nullptr;
    on_data_ = nullptr;
    on_close_ = nullptr;
  }

  boost::asio::io_context& io_;
  std::shared_ptr<transport::ByteStream> inner_;
  const bool dynamic_;
  bool started_ = false;
  bool closed_ = false;
  std::vector<uint8_t> early_;
  std::optional<std::string> early_close_;
  std::function<void(RacingChannel&)> spoke_;
  std::function<void(RacingChannel&, const std::string&)> lost_;
  DataHandler on_data_;
  CloseHandler on_close_;
};

using Done = std::function<void(std::shared_ptr<transport::Stream>, std::string)>;

// Both channels open, first to speak wins.
struct Race : std::enable_shared_from_this<Race> {
  Done done;
  std::vector<std::shared_ptr<RacingChannel>> running;
  std::vector<std::string> errors;
  int pending = 0;  // opens not answered yet
  bool decided = false;

  // A channel could not be opened (the client does not offer that kind, say).
  void failed(bool dynamic, const std::string& err) {
    errors.push_back(fmt::format("{} channel: {}", dynamic ? "dynamic" : "static", err));
    logger->debug("xrdp: {} channel not opened: {}", dynamic ? "dynamic" : "static", err);
    give_up_if_nothing_left();
  }

  void give_up_if_nothing_left() {
    if (decided || !running.empty() || pending > 0) return;
    decided = true;
    auto finish = std::move(done);
    done = nullptr;
    finish(nullptr, fmt::format("no channel: {}", fmt::join(errors, "; ")));
  }

  // The channels' callbacks own the race until it is decided (they are dropped then).
  void add(std::shared_ptr<RacingChannel> c) {
    running.push_back(c);
    auto self = shared_from_this();
    c->listen([self](RacingChannel& winner) { self->won(winner); },
              [self](RacingChannel& loser, const std::string& reason) { self->lost(loser, reason); });
  }

  void won(RacingChannel& winner) {
    if (decided) return;
    decided = true;
    std::shared_ptr<RacingChannel> keep;
    for (auto& c : running) {
      if (c.get() == &winner) {
        keep = c;
      } else {
        c->close(fmt::format("the desk speaks on the {} channel", winner.dynamic() ? "dynamic" : "static"));
      }
    }
    running.clear();
    logger->info("xrdp: the desk speaks on the {} channel CBRIDGE", winner.dynamic() ? "dynamic" : "static");
    auto finish = std::move(done);
    done = nullptr;
    finish(std::move(keep), "");
  }

  void lost(RacingChannel& loser, const std::string& reason) {
    if (decided) return;
    errors.push_back(fmt::format("{} channel: {}", loser.dynamic() ? "dynamic" : "static", reason));
    logger->debug("xrdp: the {} channel closed before the desk spoke ({})", loser.dynamic() ? "dynamic" : "static",
                    reason);
    std::erase_if(running, [&](const auto& c) {
      if (c.get() != &loser) return false;
      c->close("left the race");
      return true;
    });
    give_up_if_nothing_left();
  }
};

}  // namespace

std::string describe(const XrdpOptions& options) {
  switch (options.kind) {
    case XrdpChannelKind::kStatic: return "xrdp:static";
    case XrdpChannelKind::kDynamic: return "xrdp:dynamic";
    case XrdpChannelKind::kEither: break;
  }
  return "xrdp";
}

Connector xrdp_connector(boost::asio::io_context& io, XrdpOptions options) {
  return [&io, options](Done done) { when_attached(io, [&io, options, done] {
    auto api = api_socket_path();
    if (!api) return done(nullptr, "xrdp's channel server socket (xrdpapi_<display>) not found: not an xrdp session?");
    if (options.kind != XrdpChannelKind::kEither) {
      const bool dynamic = options.kind == XrdpChannelKind::kDynamic;
      // One kind asked for: the link is up as soon as the channel is open.
      return async_open(io, *api, options.channel, dynamic,
                        [&io, options, done, dynamic](std::shared_ptr<transport::ByteStream> s, std::string err) {
        if (!s) return done(nullptr, fmt::format("{} channel: {}", dynamic ? "dynamic" : "static", err));
        logger->info("xrdp {} channel {} open", dynamic ? "dynamic" : "static", options.channel);
        auto only = std::make_shared<RacingChannel>(io, std::move(s), dynamic);
        only->listen(nullptr, nullptr);
        done(only, "");
      });
    }
    // Both kinds. The static channel is opened first: chansrv hands static-channel data to the
    // first of its API connections with that channel's id, and a dynamic channel's id can be the
    // same number.
    auto race = std::make_shared<Race>();
    race->done = done;
    race->pending = 2;
    auto opened = [&io, race, options](bool dynamic) {
      return [&io, race, options, dynamic](std::shared_ptr<transport::ByteStream> s, std::string err) {
        --race->pending;
        if (!s) return race->failed(dynamic, err);
        if (race->decided) {
          s->close("the desk already spoke on the other channel");
          return;
        }
        logger->info("xrdp {} channel {} open", dynamic ? "dynamic" : "static", options.channel);
        race->add(std::make_shared<RacingChannel>(io, std::move(s), dynamic));
      };
    };
    async_open(io, *api, options.channel, false, [&io, race, options, api = *api, opened](
                                                     std::shared_ptr<transport::ByteStream> s, std::string err) {
      opened(false)(std::move(s), std::move(err));
      if (!race->decided) async_open(io, api, options.channel, true, opened(true));
      else --race->pending;
    });
  }); };
}

}  // namespace cardbridge::shim
