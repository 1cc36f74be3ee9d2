// The shim's control socket: one JSON request line in, one JSON line out, then close.
// Used by `cdrsession status|doctor` and by benchmarks (round-trip counters).
//   {"cmd":"status"}                 -> desk, readers, clients, counters
//   {"cmd":"ping","count":N}         -> N desk round trips, median/p99 in microseconds
//   {"cmd":"audit"}                  -> recent audit events
// Same-uid peers and root only (SO_PEERCRED); the pcsc-lite socket admits the same uid only.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "cardbridge/transport/stream.hpp"
#include "cardbridge/shim_core/shim_core.hpp"

namespace cardbridge::shim {

class ControlServer {
 public:
  // |core| must outlive the server; everything runs on |io|'s thread.
  ControlServer(boost::asio::io_context& io, ShimCore& core, nlohmann::json static_info,
                std::function<nlohmann::json()> audit = nullptr);
  ~ControlServer();
  Result<bool, std::string> start(const std::string& path);
  void stop();

  // The status document (also used in tests).
  static nlohmann::json status(const ShimCore& core, const nlohmann::json& static_info);

 private:
  void accept();
  void handle(std::shared_ptr<transport::ByteStream> stream, const std::string& line);
  void run_pings(std::shared_ptr<transport::ByteStream> stream, int remaining, std::vector<double> samples);

  boost::asio::io_context& io_;
  ShimCore& core_;
  nlohmann::json info_;
  std::function<nlohmann::json()> audit_;
  std::string path_;
  std::optional<transport::GenericAcceptor> acceptor_;
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
};

}  // namespace cardbridge::shim
