#include "cardbridge/shim_io/shim_service.hpp"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <ctime>
#include <cstring>
#include <filesystem>

#include <fmt/format.h>

#include "cardbridge/journal/audit.hpp"
#include "cardbridge/support/hex.hpp"
#include "cardbridge/support/log.hpp"

namespace cardbridge::shim {

namespace {
log::Channel logger{"cardbridge.shim.io"};
}  // namespace

Result<bool, std::string> prepare_socket_directory(const std::string& socket_path) {
  const auto dir = std::filesystem::path(socket_path).parent_path();
  if (dir.empty()) return true;
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0) {
    if (errno != ENOENT) return unexpected(fmt::format("{}: {}", dir.string(), std::strerror(errno)));
    std::error_code ec;
    std::filesystem::create_directories(dir.parent_path(), ec);
    if (::mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST)
      return unexpected(fmt::format("cannot create {}: {}", dir.string(), std::strerror(errno)));
    ::chmod(dir.c_str(), 0700);
    if (::stat(dir.c_str(), &st) != 0) return unexpected(fmt::format("{}: {}", dir.string(), std::strerror(errno)));
  }
  if (!S_ISDIR(st.st_mode)) return unexpected(fmt::format("{} is not a directory", dir.string()));
  if (st.st_uid != ::geteuid())
    return unexpected(fmt::format("{} belongs to uid {}, not to us (uid {}): use a private directory",
                                  dir.string(), st.st_uid, ::geteuid()));
  if (st.st_mode & (S_IWGRP | S_IWOTH))
    return unexpected(fmt::format("{} is writable by others: use a private directory", dir.string()));
  return true;
}

ShimService::ShimService(boost::asio::io_context& io, ServiceConfig config, std::shared_ptr<DeskLink> desk)
    : io_(io), config_(std::move(config)), desk_(std::move(desk)), core_(*this, config_.core), timer_(io) {}

ShimService::~ShimService() {
  *alive_ = false;
  stop();
}

Result<bool, std::string> ShimService::start() {
  if (auto ok = prepare_socket_directory(config_.socket_path); !ok) return ok;
  transport::Endpoint ep;
  ep.kind = transport::Endpoint::Kind::kUnix;
  ep.path = config_.socket_path;
  // 0600 plus the 0700 directory keep other users out; SO_PEERCRED is checked anyway.
  auto acceptor = transport::listen(io_, ep, 0600);
  if (!acceptor) return unexpected(acceptor.error());
  acceptor_.emplace(std::move(*acceptor));
  struct stat st {};
  if (::stat(config_.socket_path.c_str(), &st) == 0) socket_inode_ = st.st_ino;
  logger->info("serving pcsc-lite clients on {}", config_.socket_path);
  accept();

  std::weak_ptr<bool> alive = alive_;
  desk_->start(DeskLink::Events{
      [this, alive](PeerIdentity peer) {
        if (alive.expired()) return;
        core_.desk_connected(Clock::now(), std::move(peer));
        arm_timer();
      },
      [this, alive](std::span<const uint8_t> b) {
        if (!alive.expired()) on_desk_bytes(b);
      },
      [this, alive](const std::string&) {
        if (alive.expired()) return;
        core_.desk_disconnected(Clock::now());
        arm_timer();
      }});
  return true;
}

void ShimService::stop() {
  if (stopped_) return;
  stopped_ = true;
  timer_.cancel();
  if (acceptor_) {
    boost::system::error_code ec;
    acceptor_->close(ec);
  }
  // Unlink only our own socket file (another shim may have replaced it).
  struct stat st {};
  if (socket_inode_ != 0 && ::stat(config_.socket_path.c_str(), &st) == 0 && st.st_ino == socket_inode_) {
    ::unlink(config_.socket_path.c_str());
  }
  auto clients = std::move(clients_);
  clients_.clear();
  for (auto& [id, s] : clients) {
    s->close("shim stopping");
    core_.client_closed(id, Clock::now());
  }
  if (desk_) desk_->stop();
}

void ShimService::accept() {
  if (stopped_) return;
  acceptor_->async_accept([this, alive = std::weak_ptr<bool>(alive_)](boost::system::error_code ec,
                                                                     transport::GenericSocket sock) {
    if (alive.expired() || stopped_) return;
    if (ec) {
      if (ec != boost::asio::error::operation_aborted) {
        // Out of descriptors: refuse the waiting client with the descriptor kept in reserve
        // (its SCardEstablishContext fails at once, as with a pcscd that cannot serve it)
        // rather than leave it waiting. Other errors: the connection waits in the backlog.
        // Either way, try again later, backing off (100 ms, doubling to 1 s), and say so once
        // per episode.
        const auto step = accept_failures_.failed(ec, acceptor_->native_handle());
        if (step.in_a_row == 1) {
          logger->error("accept failed: {}; {}retrying with backoff, not logged again until a client is accepted",
                        ec.message(), step.refused ? "new clients are refused meanwhile; " : "");
        } else {
          logger->debug("accept still failing ({} in a row): {}{}", step.in_a_row, ec.message(),
                        step.refused ? " (a client refused)" : "");
        }
        if (step.refused) return accept();  // the next client, if any, at once
        const auto delay = std::chrono::milliseconds(100 << std::min<std::size_t>(step.in_a_row - 1, 3));
        auto t = std::make_shared<boost::asio::steady_timer>(io_, std::min(delay, std::chrono::milliseconds(1000)));
        t->async_wait([this, t, alive](boost::system::error_code) {
          if (!alive.expired() && !stopped_) accept();
        });
      }
      return;
    }
    if (const auto failed = accept_failures_.accepted(); failed != 0) {
      logger->info("accepting clients again ({} failed accepts before)", failed);
    }
    auto cred = transport::peer_credentials(sock);
    if (!cred || cred->uid != ::geteuid()) {
      logger->warn("refused a client of uid {} (pid {}): only uid {} may use this shim",
                     cred ? static_cast<long>(cred->uid) : -1L, cred ? cred->pid : -1, ::geteuid());
      boost::system::error_code ignored;
      sock.close(ignored);
      accept();
      return;
    }
    if (clients_.size() >= config_.max_clients) {
      // As pcscd at its limit: the connection is closed at once (the program's
      // SCardEstablishContext fails); logged when the episode starts and ends.
      if (!at_client_limit_) {
        logger->warn("client limit reached: {} clients (as pcscd); new clients are refused until one leaves",
                     clients_.size());
      }
      at_client_limit_ = true;
      ++refused_at_limit_;
      boost::system::error_code ignored;
      sock.close(ignored);
      accept();
      return;
    }
    if (at_client_limit_) {
      logger->info("client limit: accepting clients again ({} refused meanwhile)", refused_at_limit_);
      at_client_limit_ = false;
      refused_at_limit_ = 0;
    }
    const ClientId id = next_client_++;
    auto stream = std::make_shared<transport::ByteStream>(std::move(sock));
    clients_.emplace(id, stream);
    client_pids_[id] = cred->pid;
    logger->debug("client {}: pid {}", id, cred->pid);
    core_.client_opened(id, Clock::now());
    stream->start([this, id](std::span<const uint8_t> data) {
                    core_.client_data(id, data, Clock::now());
                    arm_timer();  // a request to the desk may have started the liveness clock
                  },
                  [this, id](const std::string&) {
                    clients_.erase(id);
                    core_.client_closed(id, Clock::now());
                    client_pids_.erase(id);
                  });
    accept();
  });
}

void ShimService::send_to_client(ClientId id, std::vector<uint8_t> bytes) {
  auto it = clients_.find(id);
  if (it == clients_.end()) return;
  it->second->send(std::move(bytes));
  // A client that sends requests but never reads the answers would make us buffer without
  // bound (pcscd's thread would simply block). Drop it; the core forgets it off this stack.
  constexpr std::size_t kMaxUnread = 1 << 20;
  if (it->second->queued_bytes() > kMaxUnread) {
    logger->warn("client {}: more than {} bytes of answers unread; closing the connection", id, kMaxUnread);
    auto s = it->second;
    clients_.erase(it);
    s->close("not reading");
    boost::asio::post(io_, [this, id, alive = std::weak_ptr<bool>(alive_)] {
      if (alive.expired()) return;
      client_pids_.erase(id);
      core_.client_closed(id, Clock::now());
    });
  }
}

void ShimService::close_client(ClientId id) {
  client_pids_.erase(id);
  auto it = clients_.find(id);
  if (it == clients_.end()) return;
  auto s = it->second;
  clients_.erase(it);
  s->close("closed by the shim");
}

// The core's event, with who and where: journald entry (audit.hpp), log line, and the recent
// events the control socket shows (cdrsession status).
void ShimService::audit_record(ClientId client, const AuditRecord& record) {
  int pid = 0;
  if (auto it = client_pids_.find(client); it != client_pids_.end()) pid = it->second;
  const std::string exe = pid ? audit::executable_of(pid) : std::string();
  const std::string text = record.text();
  const std::string line = pid ? fmt::format("{} pid={}", text, pid) : text;
  const bool desk_event = record.kind == AuditRecord::Kind::kDeskConnected ||
                          record.kind == AuditRecord::Kind::kDeskDisconnected;
  audit::Event e(record.event_name(), line);
  e.with("USER", audit::user_name(::geteuid()))
      .with("UID", std::to_string(::geteuid()))
      .with("SESSION", config_.session)
      .with("DESK", log::printable(desk_event ? record.desk_name : core_.desk_name()))
      .with("DESK_SOFTWARE", log::printable(desk_event ? record.desk_software : core_.desk_software()))
      .with("DESK_LINK", config_.desk_link)
      .with("DESK_IDENTITY", desk_event ? log::printable(record.desk_identity) : core_.desk_identity())
      .with("READER", log::printable(record.reader))
      .with("ATR", to_hex(record.atr, false))
      .with("SHARE", record.kind == AuditRecord::Kind::kCardConnected ? record.share_text() : "")
      .with("PROGRAM_PID", pid ? std::to_string(pid) : "")
      .with("PROGRAM_EXE", exe)
      .with("REASON", record.reason);
  audit::emit(e);
  logger->info("audit: {}", line);
  char when[32] = {};
  const std::time_t now = std::time(nullptr);
  struct tm tm {};
  ::localtime_r(&now, &tm);
  std::strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%S%z", &tm);
  audit_.push_back(AuditEvent{when, pid, exe, text});
  while (audit_.size() > 200) audit_.pop_front();
}

void ShimService::send_to_desk(std::vector<uint8_t> frame) {
  if (desk_) desk_->send(std::move(frame));
}

void ShimService::reset_desk_link(const std::string& reason) {
  if (!desk_) return;
  // Defer: we are inside the core; the link's down event re-enters it.
  boost::asio::post(io_, [this, reason, alive = std::weak_ptr<bool>(alive_)] {
    if (!alive.expired() && desk_) desk_->reset(reason);
  });
}

void ShimService::on_desk_bytes(std::span<const uint8_t> bytes) {
  core_.desk_bytes(bytes, Clock::now());
  arm_timer();
}

// Lazy: the timer is moved only to an earlier deadline (or armed when it was not). A timer
// that fires before the core's current deadline ticks it for nothing and is armed again;
// this saves re-arming the kernel timer on every request (liveness deadlines move forward
// with each one).
void ShimService::arm_timer() {
  auto due = core_.next_deadline();
  if (!due) return;  // a pending timer that fires finds nothing due
  if (armed_ && *armed_ <= *due) return;
  armed_ = due;
  timer_.expires_at(*due);
  timer_.async_wait([this, alive = std::weak_ptr<bool>(alive_)](boost::system::error_code ec) {
    if (ec || alive.expired()) return;
    armed_.reset();
    core_.tick(Clock::now());
    arm_timer();
  });
}

}  // namespace cardbridge::shim
