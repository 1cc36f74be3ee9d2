// ShimService wires ShimCore to the world: the pcsc-lite socket clients connect to, the
// desk link, and the core's timers. Everything runs on one io_context thread.
#pragma once

#include <deque>
#include <map>
#include <memory>
#include <string>

#include "cardbridge/transport/fd_reserve.hpp"
#include "cardbridge/transport/stream.hpp"
#include "cardbridge/shim_core/shim_core.hpp"
#include "cardbridge/shim_io/desk_link.hpp"

namespace cardbridge::shim {

// pcscd serves at most this many clients (pcsc-lite PCSC_MAX_CONTEXT_THREADS) and closes
// the connection of the next one at once; so does the shim.
inline constexpr std::size_t kMaxClients = 200;

struct ServiceConfig {
  std::string socket_path;  // the pcsc-lite socket (PCSCLITE_CSOCK_NAME)
  ShimConfig core;
  std::size_t max_clients = kMaxClients;
  // For the audit trail: the session this shim serves (cdrsession's key) and its desk link.
  std::string session;
  std::string desk_link;
};

class ShimService : private ShimEffects {
 public:
  ShimService(boost::asio::io_context& io, ServiceConfig config, std::shared_ptr<DeskLink> desk);
  ~ShimService() override;

  // Binds the socket (creating its directory 0700) and starts the desk link.
  Result<bool, std::string> start();
  // Closes every client, unlinks the socket, stops the desk link.
  void stop();

  const ShimCore& core() const { return core_; }
  ShimCore& core() { return core_; }

  struct AuditEvent {
    std::string time;  // ISO 8601, local time
    int pid = 0;       // the program concerned, 0 if none
    std::string exe;   // its executable, when known
    std::string event;
  };
  // The most recent audit events (also recorded in the journal, or syslog authpriv:
  // cardbridge/journal/audit.hpp).
  const std::deque<AuditEvent>& audit_events() const { return audit_; }

 private:
  // ShimEffects
  void send_to_client(ClientId id, std::vector<uint8_t> bytes) override;
  void close_client(ClientId id) override;
  void send_to_desk(std::vector<uint8_t> frame) override;
  void reset_desk_link(const std::string& reason) override;
  void audit_record(ClientId client, const AuditRecord& record) override;

  void accept();
  void arm_timer();
  void on_desk_bytes(std::span<const uint8_t> bytes);

  boost::asio::io_context& io_;
  ServiceConfig config_;
  std::shared_ptr<DeskLink> desk_;
  ShimCore core_;
  std::optional<transport::GenericAcceptor> acceptor_;
  std::map<ClientId, std::shared_ptr<transport::ByteStream>> clients_;
  std::map<ClientId, int> client_pids_;
  std::deque<AuditEvent> audit_;
  ClientId next_client_ = 1;
  boost::asio::steady_timer timer_;
  std::optional<TimePoint> armed_;  // when timer_ fires
  bool stopped_ = false;
  // Client limit and accept failures (EMFILE...): one log line when an episode starts and
  // one when it ends, whatever happens in between (a program retrying in a loop, or an fd
  // shortage lasting minutes, must not flood the log); accept retries back off to 1 s.
  bool at_client_limit_ = false;
  std::size_t refused_at_limit_ = 0;
  transport::AcceptFailures accept_failures_;  // refuses a client at the fd limit (as pcscd), not leave it waiting
  ino_t socket_inode_ = 0;
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
};

// Creates the socket's directory with mode 0700 when missing; refuses a directory that
// another user owns or that others can write to.
Result<bool, std::string> prepare_socket_directory(const std::string& socket_path);

}  // namespace cardbridge::shim
