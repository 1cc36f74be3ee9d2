#include "cardbridge/desk_runtime/desk_runtime.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <climits>

#include <cerrno>
#include <cstring>

#include "cardbridge/journal/audit.hpp"
#include "cardbridge/support/hex.hpp"
#include "cardbridge/support/log.hpp"

namespace cardbridge::client {

namespace {
log::Channel logger{"cardbridge.desk"};
TimePoint now() { return std::chrono::steady_clock::now(); }
// Every link of this process shares what the desk learns and reads for its card images.
DeskConfig with_process_images(DeskConfig c) {
  if (!c.images) c.images = ImageStore::process();
  return c;
}
constexpr std::size_t kReadChunk = 64 * 1024;
// serve_socket: a server that reads none of our replies for this long has a dead link.
constexpr int kSendTimeoutSeconds = 10;
}  // namespace

DeskRuntime::DeskRuntime(CardApi& api, DeskConfig config, Io io)
    : api_(api),
      io_(std::move(io)),
      desk_name_(config.desk_name),
      link_(config.link),
      core_(*this, with_process_images(config)),
      monitor_(api, config.policy, [this](std::vector<protocol::ReaderInfo> readers, uint32_t service_rv) {
        Lock lock(mu_);
        if (stopped_) return;
        core_.readers(std::move(readers), now(), service_rv);
        after_event();
        wake_pool(lock);
      }) {}

DeskRuntime::~DeskRuntime() {
  stop();
  // Calls still blocked at the desk: wait for them (an owner that could not wait kept the
  // runtime until finished(), see Janitor). A call that returns may queue its lane's
  // release, for which a thread may be started: join until none is left.
  for (;;) {
    std::vector<std::thread> threads;
    {
      Lock lock(mu_);
      stopping_ = true;
      work_cv_.notify_all();
      threads.swap(threads_);
    }
    if (threads.empty()) break;
    for (auto& t : threads) t.join();
  }
  if (fd_ >= 0) ::close(fd_);
  for (int& p : wake_pipe_) {
    if (p >= 0) ::close(p);
  }
}

void DeskRuntime::start() { monitor_.start(); }

bool DeskRuntime::stop(std::chrono::milliseconds grace) {
  {
    Lock lock(mu_);
    if (!stopped_) {
      stopped_ = true;
      core_.shutdown(now());  // retires every lane: contexts are released once their calls return
      if (fd_ >= 0) ::shutdown(fd_, SHUT_RDWR);  // the reader's recv() returns
      wake_pool(lock);
    }
  }
  monitor_.stop();
  Lock lock(mu_);
  const bool idle = idle_cv_.wait_for(lock, grace, [this] { return core_.idle() && running_ == 0; });
  // Idle pool threads leave; one still making a call leaves once it has reported it.
  stopping_ = true;
  work_cv_.notify_all();
  if (!idle) logger->warn("a desk PC/SC call is still blocked at shutdown; the link's resources stay until it returns");
  return idle;
}

void DeskRuntime::set_io(std::function<void(std::vector<uint8_t>)> send,
                         std::function<void(const std::string&)> close_link,
                         std::function<void(std::optional<TimePoint>)> arm_timer) {
  {
    Lock lock(mu_);
    io_.send = std::move(send);
    io_.close_link = std::move(close_link);
  }
  set_timer(std::move(arm_timer));
}

bool DeskRuntime::finished() const {
  Lock lock(mu_);
  return core_.idle() && running_ == 0;
}

void DeskRuntime::detach_io() {
  Lock lock(mu_);
  io_ = Io{};
}

void DeskRuntime::set_timer(std::function<void(std::optional<TimePoint>)> arm_timer) {
  Lock lock(mu_);
  io_.arm_timer = std::move(arm_timer);
  armed_.reset();
  after_event();
}

// ---- events from a host --------------------------------------------------------------------

void DeskRuntime::transport_up(PeerIdentity peer) {
  Lock lock(mu_);
  if (stopped_) return;
  core_.transport_up(now(), std::move(peer));
  after_event();
  wake_pool(lock);
}

void DeskRuntime::transport_down() {
  Lock lock(mu_);
  core_.transport_down(now());
  after_event();
  wake_pool(lock);
}

void DeskRuntime::receive(std::span<const uint8_t> bytes) {
  Lock lock(mu_);
  if (stopped_) return;
  core_.receive(bytes, now());
  after_event();
  wake_pool(lock);
}

void DeskRuntime::tick() {
  Lock lock(mu_);
  armed_.reset();
  if (stopped_) return;
  core_.tick(now());
  after_event();
  wake_pool(lock);
}

void DeskRuntime::after_event() {
  const auto due = core_.next_deadline();
  if (due == armed_) return;
  armed_ = due;
  if (io_.arm_timer) io_.arm_timer(due);
  if (polling_ && due && (!polling_for_ || *due < *polling_for_) && wake_pipe_[1] >= 0) {
    const char c = 1;
    [[maybe_unused]] const ssize_t n = ::write(wake_pipe_[1], &c, 1);  // full pipe: a wake-up is pending anyway
  }
}

// ---- effects (mu_ held) -----------------------------------------------------------------

void DeskRuntime::send(std::vector<uint8_t> bytes) {
  if (fd_ >= 0) {
    // serve_socket: straight to the socket, from the thread that has the frame (frames are
    // sent under mu_, so in order). A peer that reads nothing for kSendTimeoutSeconds is
    // dropped.
    std::size_t done = 0;
    while (done < bytes.size()) {
      const ssize_t n = ::send(fd_, bytes.data() + done, bytes.size() - done, MSG_NOSIGNAL);
      if (n > 0) {
        done += static_cast<std::size_t>(n);
      } else if (n < 0 && errno == EINTR) {
        continue;
      } else {
        logger->warn("cannot send to the server ({}); dropping the connection",
                     n < 0 ? std::strerror(errno) : "closed");
        ::shutdown(fd_, SHUT_RDWR);
        return;
      }
    }
    return;
  }
  try {
    if (io_.send) io_.send(std::move(bytes));
  } catch (const std::exception& e) {
    logger->error("cannot send to the server: {}", e.what());
  } catch (...) {
    logger->error("cannot send to the server (unknown exception)");
  }
}

void DeskRuntime::close_link(const std::string& reason) {
  if (fd_ >= 0) {
    ::shutdown(fd_, SHUT_RDWR);  // the reader sees the end and reports it
    return;
  }
  try {
    if (io_.close_link) io_.close_link(reason);
  } catch (...) {
    logger->error("closing the server link failed");
  }
}

void DeskRuntime::execute(LaneId lane, PcscCall c) { tasks_.push_back(Task{lane, std::move(c)}); }

void DeskRuntime::lane_closed(LaneId) {
  if (core_.idle()) idle_cv_.notify_all();
}

// ---- the call pool ------------------------------------------------------------------------

// Gives every queued task a thread (an idle one, else a new one) and, when serving a
// socket, makes sure some thread has the reading turn. Threads are added only when none
// is idle: at most one per call in flight, plus the reader.
void DeskRuntime::wake_pool(Lock&) {
  const bool need_reader = fd_ >= 0 && !reading_ && !socket_done_ && !stopped_;
  const std::size_t wanted = tasks_.size() + (need_reader ? 1 : 0);
  for (std::size_t i = 0; i < std::min(wanted, idle_threads_); ++i) work_cv_.notify_one();
  for (std::size_t i = idle_threads_; i < wanted; ++i) {
    ++idle_threads_;  // counted as idle until it takes work
    threads_.emplace_back([this] { pool_loop(); });
  }
}

void DeskRuntime::pool_loop() {
  Lock lock(mu_);
  for (;;) {
    const bool read_turn_free = fd_ >= 0 && !reading_ && !socket_done_ && !stopped_;
    if (!tasks_.empty()) {
      --idle_threads_;
      Task t = std::move(tasks_.front());
      tasks_.pop_front();
      run(lock, std::move(t));
      ++idle_threads_;
      continue;
    }
    if (read_turn_free) {
      --idle_threads_;
      read_turn(lock);
      ++idle_threads_;
      continue;
    }
    if (stopping_) break;
    work_cv_.wait(lock);
  }
  --idle_threads_;
}

void DeskRuntime::run(Lock& lock, Task task) {
  ++running_;
  lock.unlock();
  CallResult r = run_call(api_, task.call);
  lock.lock();
  --running_;
  core_.call_done(task.lane, std::move(r), now());
  after_event();
  wake_pool(lock);  // the lane's next call is taken by this thread (it loops), others by idle ones
  if (core_.idle() && running_ == 0) idle_cv_.notify_all();
}

// serve_socket: this thread holds the reading turn until a request gives it a call to make
// (it hands the turn on first) or the connection ends. Waiting for data and for the
// core's next deadline (hello retries) happens here too.
void DeskRuntime::read_turn(Lock& lock) {
  reading_ = true;
  std::vector<uint8_t> buf(kReadChunk);
  while (!stopped_ && !socket_done_) {
    const int fd = fd_;
    // Wait for data, or until the core's deadline (hello retries, the card image's
    // pauses), or for after_event() to say the deadline moved earlier; then tick the core.
    int timeout_ms = -1;
    if (armed_) {
      const auto left = std::chrono::ceil<std::chrono::milliseconds>(*armed_ - now()).count();
      timeout_ms = static_cast<int>(std::clamp<int64_t>(left, 0, INT_MAX));
    }
    polling_ = true;
    polling_for_ = armed_;
    lock.unlock();
    pollfd fds[2] = {{fd, POLLIN, 0}, {wake_pipe_[0], POLLIN, 0}};
    const int ready = ::poll(fds, wake_pipe_[0] >= 0 ? 2 : 1, timeout_ms);
    ssize_t n = -1;
    int err = ready < 0 ? errno : EAGAIN;
    if (ready > 0 && wake_pipe_[0] >= 0 && (fds[1].revents & POLLIN)) {
      char drain[16];
      while (::read(wake_pipe_[0], drain, sizeof drain) > 0) {
      }
    }
    if (ready > 0 && (fds[0].revents & (POLLIN | POLLHUP | POLLERR))) {
      n = ::recv(fd, buf.data(), buf.size(), MSG_DONTWAIT);
      err = errno;
    }
    lock.lock();
    polling_ = false;
    polling_for_.reset();
    if (n > 0) {
      core_.receive(std::span<const uint8_t>(buf.data(), static_cast<std::size_t>(n)), now());
      after_event();
    } else if (n < 0 && (err == EAGAIN || err == EWOULDBLOCK || err == EINTR)) {
      if (armed_ && now() >= *armed_) {
        armed_.reset();
        core_.tick(now());
        after_event();
      }
    } else {
      socket_closed(lock, n == 0 ? "closed by peer" : std::strerror(err));
      break;
    }
    if (!tasks_.empty()) break;  // make the call here; someone else reads meanwhile
  }
  reading_ = false;
  std::optional<Task> mine;
  if (!tasks_.empty()) {
    mine = std::move(tasks_.front());
    tasks_.pop_front();
  }
  wake_pool(lock);  // the reading turn to an idle thread (or a new one), and any other task
  if (mine) run(lock, std::move(*mine));
}

void DeskRuntime::socket_closed(Lock& lock, const std::string& reason) {
  if (socket_done_) return;
  socket_done_ = true;
  core_.transport_down(now());
  after_event();
  if (stopped_ || !socket_closed_) return;
  auto cb = std::move(socket_closed_);
  lock.unlock();
  cb(reason);
  lock.lock();
}

void DeskRuntime::serve_socket(int fd, PeerIdentity peer, std::function<void(const std::string&)> closed) {
  Lock lock(mu_);
  fd_ = fd;
  socket_closed_ = std::move(closed);
  if (wake_pipe_[0] < 0 && ::pipe2(wake_pipe_, O_NONBLOCK | O_CLOEXEC) != 0) {
    wake_pipe_[0] = wake_pipe_[1] = -1;  // the reader then wakes only for data and known deadlines
    logger->warn("cannot create the runtime's wake-up pipe: {}", std::strerror(errno));
  }
  struct timeval tv {};
  tv.tv_sec = kSendTimeoutSeconds;
  ::setsockopt(fd_, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  if (stopped_) return;
  core_.transport_up(now(), std::move(peer));
  after_event();
  wake_pool(lock);
}

// ---- introspection ----------------------------------------------------------------------

bool DeskRuntime::session_established() const {
  Lock lock(mu_);
  return core_.session_established();
}

std::string DeskRuntime::server_name() const {
  Lock lock(mu_);
  return core_.server_name();
}

DeskStats DeskRuntime::stats() const {
  Lock lock(mu_);
  return core_.stats();
}

// The core's event with who runs the desk: a journald entry at the desk (or syslog), and a
// log line (the add-in's WLog, the agent's journal or stderr).
void DeskRuntime::audit(const DeskAudit& e) {
  const unsigned uid = ::geteuid();
  audit::Event ev(e.event_name(), e.text());
  ev.with("USER", audit::user_name(uid))
      .with("UID", std::to_string(uid))
      .with("DESK", log::printable(desk_name_))
      .with("DESK_LINK", link_)
      .with("SERVER", log::printable(e.server))
      .with("READER", log::printable(e.reader))
      .with("ATR", to_hex(e.atr, false))
      .with("CONTROL_CODE", e.kind == DeskAudit::Kind::kControlRefused ? fmt::format("0x{:08X}", e.code) : "")
      .with("REASON", e.reason);
  audit::emit(ev);
  logger->info("audit: {}", e.text());
}

protocol::ReaderSnapshot DeskRuntime::current_readers() const {
  Lock lock(mu_);
  return core_.current_readers();
}

}  // namespace cardbridge::client
