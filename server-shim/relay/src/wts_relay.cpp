#include "cardbridge/wts_relay/wts_relay.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>
#include <winpr/synch.h>
#include <winpr/wtsapi.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <filesystem>
#include <mutex>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "cardbridge/support/log.hpp"

namespace cardbridge::shim {

namespace {

using Clock = std::chrono::steady_clock;

log::Channel logger{"cardbridge.relay"};

constexpr std::size_t kReadChunk = 64 * 1024;
// Per wake-up budget for channel messages, so that one busy direction cannot starve the other.
constexpr int kMaxMessagesPerWake = 256;
constexpr std::size_t kMaxBytesPerWake = 4u * 1024u * 1024u;

std::string errno_text(int e) { return std::strerror(e); }

void close_fd(int& fd) {
  if (fd >= 0) ::close(fd);
  fd = -1;
}

// Creates the socket's directory 0700 when missing; refuses one that belongs to someone else or
// that others can write to.
Result<bool, std::string> prepare_directory(const std::string& socket_path, uid_t peer_uid) {
  const auto dir = std::filesystem::path(socket_path).parent_path();
  if (dir.empty()) return true;
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0) {
    if (errno != ENOENT) return unexpected(fmt::format("{}: {}", dir.string(), errno_text(errno)));
    std::error_code ec;
    std::filesystem::create_directories(dir.parent_path(), ec);
    if (::mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST)
      return unexpected(fmt::format("cannot create {}: {}", dir.string(), errno_text(errno)));
    ::chmod(dir.c_str(), 0700);
    if (peer_uid != ::geteuid() && ::chown(dir.c_str(), peer_uid, static_cast<gid_t>(-1)) != 0)
      return unexpected(fmt::format("cannot hand {} to uid {}: {}", dir.string(), peer_uid, errno_text(errno)));
    if (::stat(dir.c_str(), &st) != 0) return unexpected(fmt::format("{}: {}", dir.string(), errno_text(errno)));
  }
  if (!S_ISDIR(st.st_mode)) return unexpected(fmt::format("{} is not a directory", dir.string()));
  if (st.st_uid != ::geteuid() && st.st_uid != peer_uid)
    return unexpected(fmt::format("{} belongs to uid {}: use a private directory", dir.string(), st.st_uid));
  if (st.st_mode & (S_IWGRP | S_IWOTH))
    return unexpected(fmt::format("{} is writable by others: use a private directory", dir.string()));
  return true;
}

Result<int, std::string> bind_socket(const std::string& path, uid_t peer_uid, ino_t* inode) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof addr.sun_path)
    return unexpected(fmt::format("socket path '{}' is empty or too long", path));
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  const auto* sa = reinterpret_cast<const sockaddr*>(&addr);

  struct stat st {};
  if (::lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) return unexpected(fmt::format("{} exists and is not a socket", path));
    // A live relay answers: refuse to steal its socket. Otherwise the file is stale.
    int probe = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (probe < 0) return unexpected(fmt::format("socket: {}", errno_text(errno)));
    const bool live = ::connect(probe, sa, sizeof addr) == 0;
    ::close(probe);
    if (live) return unexpected(fmt::format("{} is in use by a running relay", path));
    logger->info("replacing stale socket {}", path);
    ::unlink(path.c_str());
  }
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return unexpected(fmt::format("socket: {}", errno_text(errno)));
  if (::bind(fd, sa, sizeof addr) != 0) {
    const int e = errno;
    ::close(fd);
    return unexpected(fmt::format("cannot bind {}: {}", path, errno_text(e)));
  }
  // The 0700 directory keeps others out between bind() and chmod(); SO_PEERCRED is checked too.
  ::chmod(path.c_str(), 0600);
  if (peer_uid != ::geteuid() && ::chown(path.c_str(), peer_uid, static_cast<gid_t>(-1)) != 0) {
    const int e = errno;
    ::close(fd);
    ::unlink(path.c_str());
    return unexpected(fmt::format("cannot hand {} to uid {}: {}", path, peer_uid, errno_text(e)));
  }
  if (::listen(fd, 8) != 0) {
    const int e = errno;
    ::close(fd);
    ::unlink(path.c_str());
    return unexpected(fmt::format("cannot listen on {}: {}", path, errno_text(e)));
  }
  if (::stat(path.c_str(), &st) == 0) *inode = st.st_ino;
  return fd;
}

}  // namespace

const char* to_string(WtsRelay::ChannelKind kind) {
  return kind == WtsRelay::ChannelKind::kStatic ? "static" : "dynamic";
}

class WtsRelay::Impl {
 public:
  explicit Impl(Options o) : opt_(std::move(o)) {}
  ~Impl() { stop(); }

  Result<bool, std::string> start() {
    peer_uid_ = opt_.peer_uid.value_or(::geteuid());
    if (auto ok = prepare_directory(opt_.socket_path, peer_uid_); !ok) return ok;
    auto fd = bind_socket(opt_.socket_path, peer_uid_, &socket_inode_);
    if (!fd) return unexpected(fd.error());
    listen_fd_ = *fd;
    wake_fd_ = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (wake_fd_ < 0) return unexpected(fmt::format("eventfd: {}", errno_text(errno)));
    try {
      thread_ = std::thread([this] { run(); });
    } catch (const std::exception& e) {
      return unexpected(fmt::format("cannot start the relay thread: {}", e.what()));
    }
    logger->info("relay listening on {} (shim uid {})", opt_.socket_path, peer_uid_);
    return true;
  }

  void stop() {
    {
      std::lock_guard lock(mu_);
      if (stopping_) return;
      stopping_ = true;
    }
    wake();
    if (thread_.joinable()) thread_.join();
    close_shim("relay stopping");
    close_fd(listen_fd_);
    close_fd(wake_fd_);
    struct stat st {};
    if (socket_inode_ != 0 && ::stat(opt_.socket_path.c_str(), &st) == 0 && st.st_ino == socket_inode_)
      ::unlink(opt_.socket_path.c_str());
  }

  AttachmentId attach(HANDLE channel, ChannelKind kind, std::string label) {
    std::unique_lock lock(mu_);
    const AttachmentId id = next_id_++;
    desired_ = Desired{id, channel, kind, std::move(label)};
    desired_reason_ = "replaced by a new channel";
    const auto gen = ++request_gen_;
    wait_applied(lock, gen);
    return id;
  }

  void detach(AttachmentId id, const std::string& reason) {
    std::unique_lock lock(mu_);
    if (desired_ && desired_->id == id) {
      desired_.reset();
      desired_reason_ = reason;
      ++request_gen_;
    }
    // Wait even when |id| was already replaced: the relay thread may not have let go of it yet.
    wait_applied(lock, request_gen_);
  }

  Stats stats() const {
    Stats s;
    s.bytes_to_shim = bytes_to_shim_.load();
    s.bytes_to_channel = bytes_to_channel_.load();
    s.dropped_to_shim = dropped_to_shim_.load();
    s.dropped_to_channel = dropped_to_channel_.load();
    s.shim_connections = shim_connections_.load();
    s.shim_drops = shim_drops_.load();
    s.shim_connected = shim_connected_.load();
    s.attached = attached_.load();
    return s;
  }

  const std::string& socket_path() const { return opt_.socket_path; }

 private:
  struct Desired {
    AttachmentId id;
    HANDLE handle;
    ChannelKind kind;
    std::string label;
  };
  struct Channel {
    AttachmentId id = 0;
    HANDLE handle = nullptr;
    ChannelKind kind = ChannelKind::kStatic;
    std::string label;
    int event_fd = -1;  // WinPR's, never closed by us
    bool alive = false;
  };

  // Caller holds |lock|. Returns at once on the relay thread itself (it applies on its next
  // turn) and when the relay has stopped.
  void wait_applied(std::unique_lock<std::mutex>& lock, std::uint64_t gen) {
    if (std::this_thread::get_id() == thread_.get_id()) return;
    wake();
    cv_.wait(lock, [&] { return applied_gen_ >= gen || thread_done_; });
  }

  void wake() {
    if (wake_fd_ < 0) return;
    const uint64_t one = 1;
    [[maybe_unused]] auto n = ::write(wake_fd_, &one, sizeof one);
  }

  // ---- relay thread ------------------------------------------------------------------------

  void run() {
    try {
      loop();
    } catch (const std::exception& e) {
      logger->critical("relay thread failed: {}", e.what());
    } catch (...) {
      logger->critical("relay thread failed");
    }
    release_channel("relay stopping", false);
    std::lock_guard lock(mu_);
    thread_done_ = true;
    cv_.notify_all();
  }

  // Applies attach/detach requests. Returns false when the relay is stopping.
  bool apply_requests() {
    std::optional<Desired> want;
    std::string reason;
    std::uint64_t gen = 0;
    {
      std::lock_guard lock(mu_);
      if (stopping_) return false;
      if (applied_gen_ == request_gen_) return true;
      want = desired_;
      reason = desired_reason_;
      gen = request_gen_;
    }
    if (chan_.handle && (!want || want->id != chan_.id)) release_channel(reason, true);
    if (want && !chan_.handle) adopt(*want);
    {
      std::lock_guard lock(mu_);
      applied_gen_ = gen;
    }
    cv_.notify_all();
    return true;
  }

  void adopt(const Desired& d) {
    chan_ = Channel{d.id, d.handle, d.kind, d.label, -1, false};
    attached_ = d.id;
    void* buf = nullptr;
    DWORD len = 0;
    HANDLE event = nullptr;
    if (WTSVirtualChannelQuery(d.handle, WTSVirtualEventHandle, &buf, &len) && buf && len >= sizeof(HANDLE)) {
      std::memcpy(&event, buf, sizeof event);
    }
    if (buf) WTSFreeMemory(buf);
    chan_.event_fd = event ? GetEventFileDescriptor(event) : -1;
    if (chan_.event_fd < 0) {
      logger->error("{} channel ({}): no event handle; not relaying it", to_string(d.kind), d.label);
      return;
    }
    chan_.alive = true;
    logger->info("{} channel attached ({}){}", to_string(d.kind), d.label,
                   shim_fd_ >= 0 ? "" : "; waiting for the shim to connect");
  }

  // Forgets the attached channel; the channel going away closes the shim connection.
  void release_channel(const std::string& reason, bool close_shim_too) {
    if (!chan_.handle) return;
    logger->info("{} channel detached ({}): {}", to_string(chan_.kind), chan_.label, reason);
    chan_ = Channel{};
    attached_ = 0;
    if (close_shim_too && shim_fd_ >= 0) close_shim("the desk's channel went away");
  }

  void channel_lost(const std::string& reason) {
    if (!chan_.alive) return;
    chan_.alive = false;
    logger->warn("{} channel ({}) lost: {}", to_string(chan_.kind), chan_.label, reason);
    if (shim_fd_ >= 0) close_shim("the desk's channel went away");
    if (opt_.on_channel_lost) {
      try {
        opt_.on_channel_lost(chan_.id, reason);
      } catch (...) {
      }
    }
  }

  bool channel_usable() const { return chan_.handle && chan_.alive; }

  void loop() {
    std::vector<pollfd> fds;
    while (apply_requests()) {
      fds.clear();
      fds.push_back({wake_fd_, POLLIN, 0});
      fds.push_back({listen_fd_, POLLIN, 0});
      const std::size_t shim_at = fds.size();
      const std::uint64_t shim_serial = shim_serial_;
      if (shim_fd_ >= 0) fds.push_back({shim_fd_, static_cast<short>(POLLIN | (outq_bytes_ ? POLLOUT : 0)), 0});
      const std::size_t chan_at = fds.size();
      if (channel_usable()) fds.push_back({chan_.event_fd, POLLIN, 0});

      int timeout = -1;
      if (shim_fd_ >= 0 && outq_bytes_) {
        auto left = std::chrono::duration_cast<std::chrono::milliseconds>(last_progress_ + opt_.stall_timeout - Clock::now());
        timeout = static_cast<int>(std::clamp<std::chrono::milliseconds::rep>(left.count() + 1, 0, 1000));
      }
      int n = ::poll(fds.data(), static_cast<nfds_t>(fds.size()), timeout);
      if (n < 0) {
        if (errno == EINTR) continue;
        throw std::runtime_error(fmt::format("poll: {}", errno_text(errno)));
      }
      if (fds[0].revents) {
        uint64_t v = 0;
        [[maybe_unused]] auto r = ::read(wake_fd_, &v, sizeof v);
      }
      if (fds[1].revents & POLLIN) accept_shim();
      // The shim connection may have changed in accept_shim(): only use revents if it did not.
      if (shim_at < chan_at && shim_fd_ >= 0 && shim_serial_ == shim_serial) {
        const short ev = fds[shim_at].revents;
        if (ev & POLLOUT) flush_shim();
        if (shim_fd_ >= 0 && (ev & (POLLIN | POLLHUP | POLLERR))) read_shim();
      }
      if (chan_at < fds.size() && channel_usable() && chan_.event_fd == fds[chan_at].fd && fds[chan_at].revents)
        read_channel();
      if (shim_fd_ >= 0 && outq_bytes_ && Clock::now() - last_progress_ >= opt_.stall_timeout) {
        close_shim(fmt::format("the shim has read nothing for {} ms with {} bytes waiting", opt_.stall_timeout.count(),
                               outq_bytes_),
                   true);
      }
    }
  }

  void accept_shim() {
    for (;;) {
      int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd < 0) {
        if (errno == EINTR) continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != ECONNABORTED)
          logger->error("accept on {}: {}", opt_.socket_path, errno_text(errno));
        return;
      }
      ucred cred{};
      socklen_t len = sizeof cred;
      if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0 || cred.uid != peer_uid_) {
        logger->warn("refused a connection from uid {} (pid {}): only uid {} may use this relay",
                       static_cast<long>(cred.uid), cred.pid, peer_uid_);
        ::close(fd);
        continue;
      }
      if (shim_fd_ >= 0) close_shim("replaced by a new shim connection");
      shim_fd_ = fd;
      ++shim_serial_;
      shim_connected_ = true;
      ++shim_connections_;
      in_buf_.clear();
      outq_.clear();
      outq_bytes_ = 0;
      out_off_ = 0;
      logger->info("shim connected (pid {}){}", cred.pid,
                     channel_usable() ? fmt::format("; relaying to the {} channel ({})", to_string(chan_.kind), chan_.label)
                                      : std::string("; no channel yet: its bytes are dropped until one is attached"));
    }
  }

  // |counted|: the relay decided to drop the connection (as opposed to the shim leaving).
  void close_shim(const std::string& reason, bool counted = true) {
    if (shim_fd_ < 0) return;
    if (counted) {
      ++shim_drops_;
      logger->info("closing the shim connection: {}", reason);
    } else {
      logger->info("shim connection closed: {}", reason);
    }
    ::shutdown(shim_fd_, SHUT_RDWR);
    close_fd(shim_fd_);
    shim_connected_ = false;
    in_buf_.clear();
    outq_.clear();
    outq_bytes_ = 0;
    out_off_ = 0;
  }

  void read_shim() {
    uint8_t buf[kReadChunk];
    ssize_t n = ::recv(shim_fd_, buf, sizeof buf, 0);
    if (n == 0) {
      close_shim("closed by the shim", false);
      return;
    }
    if (n < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return;
      close_shim(errno_text(errno), false);
      return;
    }
    in_buf_.insert(in_buf_.end(), buf, buf + n);
    // Find the end of the last complete frame.
    std::size_t pos = 0;
    while (in_buf_.size() - pos >= protocol::kFrameHeaderSize) {
      const uint8_t* h = in_buf_.data() + pos;
      const std::size_t len = (std::size_t{h[0]} << 24) | (std::size_t{h[1]} << 16) | (std::size_t{h[2]} << 8) | h[3];
      if (len == 0 || len > opt_.max_frame_payload) {
        close_shim(fmt::format("the shim sent a frame header announcing {} bytes (limit {})", len,
                               opt_.max_frame_payload));
        return;
      }
      if (in_buf_.size() - pos - protocol::kFrameHeaderSize < len) break;
      pos += protocol::kFrameHeaderSize + len;
    }
    if (pos == 0) return;
    if (channel_usable()) {
      ULONG written = 0;
      if (!WTSVirtualChannelWrite(chan_.handle, reinterpret_cast<PCHAR>(in_buf_.data()), static_cast<ULONG>(pos),
                                  &written)) {
        dropped_to_channel_ += pos;
        channel_lost("WTSVirtualChannelWrite failed");
        return;  // the shim connection is closed now
      }
      bytes_to_channel_ += pos;
    } else {
      dropped_to_channel_ += pos;
    }
    in_buf_.erase(in_buf_.begin(), in_buf_.begin() + static_cast<std::ptrdiff_t>(pos));
  }

  void read_channel() {
    std::vector<uint8_t> msg;
    std::size_t bytes = 0;
    for (int i = 0; i < kMaxMessagesPerWake && bytes < kMaxBytesPerWake && channel_usable(); ++i) {
      ULONG size = 0;
      if (!WTSVirtualChannelRead(chan_.handle, 0, nullptr, 0, &size)) {
        check_channel_open();
        return;
      }
      // A zero-length message is consumed with a 1-byte buffer (a null buffer only peeks).
      msg.resize(std::max<ULONG>(size, 1));
      ULONG got = 0;
      if (!WTSVirtualChannelRead(chan_.handle, 0, reinterpret_cast<PCHAR>(msg.data()), static_cast<ULONG>(msg.size()),
                                 &got)) {
        check_channel_open();
        return;
      }
      bytes += got;
      if (got) to_shim(msg.data(), got);
    }
  }

  // WTSVirtualChannelRead failed. For a dynamic channel that means the client closed it (WinPR
  // queues a quit message, which stays at the head of the queue); a static channel just had no
  // message.
  void check_channel_open() {
    if (chan_.kind != ChannelKind::kDynamic) return;
    void* buf = nullptr;
    DWORD len = 0;
    BOOL ready = FALSE;
    const BOOL ok = WTSVirtualChannelQuery(chan_.handle, WTSVirtualChannelReady, &buf, &len);
    if (buf && len >= sizeof ready) std::memcpy(&ready, buf, sizeof ready);
    if (buf) WTSFreeMemory(buf);
    if (!ok || !ready) channel_lost("the client closed the dynamic channel");
  }

  void to_shim(const uint8_t* data, std::size_t n) {
    if (shim_fd_ < 0) {
      dropped_to_shim_ += n;
      return;
    }
    std::size_t done = 0;
    if (outq_.empty()) {
      ssize_t w = ::send(shim_fd_, data, n, MSG_NOSIGNAL);
      if (w < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
          close_shim(errno_text(errno), false);
          dropped_to_shim_ += n;
          return;
        }
        w = 0;
      }
      done = static_cast<std::size_t>(w);
      bytes_to_shim_ += done;
      if (done == n) return;
    }
    const std::size_t rest = n - done;
    if (outq_bytes_ + rest > opt_.max_queued_bytes) {
      dropped_to_shim_ += rest;
      close_shim(fmt::format("the shim is not reading: {} bytes would wait (limit {})", outq_bytes_ + rest,
                             opt_.max_queued_bytes));
      return;
    }
    if (outq_bytes_ == 0) last_progress_ = Clock::now();
    outq_.emplace_back(data + done, data + n);
    outq_bytes_ += rest;
  }

  void flush_shim() {
    while (!outq_.empty()) {
      auto& front = outq_.front();
      ssize_t w = ::send(shim_fd_, front.data() + out_off_, front.size() - out_off_, MSG_NOSIGNAL);
      if (w < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return;
        close_shim(errno_text(errno), false);
        return;
      }
      const auto wn = static_cast<std::size_t>(w);
      bytes_to_shim_ += wn;
      outq_bytes_ -= wn;
      out_off_ += wn;
      if (wn > 0) last_progress_ = Clock::now();
      if (out_off_ == front.size()) {
        outq_.pop_front();
        out_off_ = 0;
      }
    }
  }

  Options opt_;
  uid_t peer_uid_ = 0;
  int listen_fd_ = -1;
  int wake_fd_ = -1;
  ino_t socket_inode_ = 0;
  std::thread thread_;

  // Shared with the API (under mu_).
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::optional<Desired> desired_;
  std::string desired_reason_;
  std::uint64_t request_gen_ = 0;
  std::uint64_t applied_gen_ = 0;
  AttachmentId next_id_ = 1;
  bool stopping_ = false;
  bool thread_done_ = false;

  // Relay thread only.
  Channel chan_;
  int shim_fd_ = -1;
  std::uint64_t shim_serial_ = 0;  // counts accepted connections
  std::vector<uint8_t> in_buf_;                // shim -> channel, up to the last complete frame
  std::deque<std::vector<uint8_t>> outq_;      // channel -> shim, waiting for the socket
  std::size_t outq_bytes_ = 0;
  std::size_t out_off_ = 0;                    // bytes of outq_.front() already written
  Clock::time_point last_progress_{};

  std::atomic<std::uint64_t> bytes_to_shim_{0}, bytes_to_channel_{0}, dropped_to_shim_{0}, dropped_to_channel_{0},
      shim_connections_{0}, shim_drops_{0};
  std::atomic<bool> shim_connected_{false};
  std::atomic<AttachmentId> attached_{0};
};

Result<std::unique_ptr<WtsRelay>, std::string> WtsRelay::start(Options options) {
  auto impl = std::make_unique<Impl>(std::move(options));
  if (auto ok = impl->start(); !ok) return unexpected(ok.error());
  return std::unique_ptr<WtsRelay>(new WtsRelay(std::move(impl)));
}

WtsRelay::WtsRelay(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
WtsRelay::~WtsRelay() = default;

WtsRelay::AttachmentId WtsRelay::attach_channel(HANDLE channel, ChannelKind kind, std::string label) {
  return impl_->attach(channel, kind, std::move(label));
}

void WtsRelay::detach_channel(AttachmentId id, const std::string& reason) { impl_->detach(id, reason); }

WtsRelay::Stats WtsRelay::stats() const { return impl_->stats(); }

const std::string& WtsRelay::socket_path() const { return impl_->socket_path(); }

}  // namespace cardbridge::shim
