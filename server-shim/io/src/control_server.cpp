#include "cardbridge/shim_io/control_server.hpp"

#include <unistd.h>

#include <algorithm>
#include <chrono>

#include "cardbridge/protocol/version.hpp"
#include "cardbridge/support/hex.hpp"
#include "cardbridge/support/log.hpp"
#include "cardbridge/support/scard.hpp"

namespace cardbridge::shim {

namespace {
log::Channel logger{"cardbridge.shim.control"};
constexpr std::size_t kMaxRequest = 4096;
constexpr int kMaxPings = 1000;
}  // namespace

ControlServer::ControlServer(boost::asio::io_context& io, ShimCore& core, nlohmann::json static_info,
                             std::function<nlohmann::json()> audit)
    : io_(io), core_(core), info_(std::move(static_info)), audit_(std::move(audit)) {}

ControlServer::~ControlServer() {
  *alive_ = false;
  stop();
}

Result<bool, std::string> ControlServer::start(const std::string& path) {
  transport::Endpoint ep;
  ep.kind = transport::Endpoint::Kind::kUnix;
  ep.path = path;
  auto a = transport::listen(io_, ep, 0600);
  if (!a) return unexpected(a.error());
  acceptor_.emplace(std::move(*a));
  path_ = path;
  accept();
  return true;
}

void ControlServer::stop() {
  if (!acceptor_) return;
  boost::system::error_code ec;
  acceptor_->close(ec);
  acceptor_.reset();
  ::unlink(path_.c_str());
}

void ControlServer::accept() {
  acceptor_->async_accept([this, alive = std::weak_ptr<bool>(alive_)](boost::system::error_code ec,
                                                                     transport::GenericSocket sock) {
    if (alive.expired() || !acceptor_) return;
    if (ec) {
      // EMFILE and friends: try again shortly rather than spin (the shim's own accept says
      // so in the log).
      if (ec != boost::asio::error::operation_aborted) {
        auto t = std::make_shared<boost::asio::steady_timer>(acceptor_->get_executor(), std::chrono::milliseconds(200));
        t->async_wait([this, t, alive](boost::system::error_code) {
          if (!alive.expired() && acceptor_) accept();
        });
      }
      return;
    }
    // The session's user, and root (the helpdesk's `cdrsession status --all`, `doctor --user`).
    // The socket's 0600 mode and 0700 directory already keep everyone else out.
    auto cred = transport::peer_credentials(sock);
    if (!cred || (cred->uid != ::geteuid() && cred->uid != 0)) {
      logger->warn("control: refused uid {}", cred ? static_cast<long>(cred->uid) : -1L);
      accept();
      return;
    }
    auto stream = std::make_shared<transport::ByteStream>(std::move(sock));
    auto buf = std::make_shared<std::string>();
    std::weak_ptr<transport::ByteStream> weak = stream;
    stream->start(
        [this, weak, buf, alive](std::span<const uint8_t> data) {
          auto s = weak.lock();
          if (!s || alive.expired()) return;
          buf->append(data.begin(), data.end());
          if (buf->size() > kMaxRequest) {
            s->close("request too large");
            return;
          }
          auto nl = buf->find('\n');
          if (nl == std::string::npos) return;
          handle(s, buf->substr(0, nl));
        },
        [stream](const std::string&) {});  // keeps the stream alive until it closes
    accept();
  });
}

nlohmann::json ControlServer::status(const ShimCore& core, const nlohmann::json& static_info) {
  nlohmann::json j = static_info;
  j["desk"] = {{"connected", core.desk_up()},
               {"name", core.desk_up() ? core.desk_name() : ""},
               {"software", core.desk_up() ? core.desk_software() : ""},
               {"identity", core.desk_up() ? core.desk_identity() : ""},
               {"capabilities", protocol::capabilities_text(core.negotiated_capabilities())},
               {"session", core.desk_generation()},
               // The desk's own PC/SC service (capability desk-service): "ok", or the error.
               {"pcsc_service", core.desk_service_rv() == 0 ? std::string("ok") : scard::rv_text(core.desk_service_rv())}};
  j["readers"] = nlohmann::json::array();
  for (std::size_t i = 0; i < ReaderTable::kSlots; ++i) {
    const auto& s = core.readers().slot(i);
    if (!s.used()) continue;
    static constexpr const char* kDeskImage[] = {"none", "partial", "complete"};
    // The card image: what the desk holds, and what this shim received (sizes only: the
    // content is personal data and never leaves the core).
    nlohmann::json image = {{"desk", kDeskImage[std::min<uint32_t>(s.desk_image, 2)]}, {"held", false}};
    if (const auto* vc = core.card_image(i)) {
      image["held"] = true;
      image["complete"] = vc->complete();
      image["selects"] = vc->index().image().selects.size();
      image["files"] = vc->index().image().files.size();
    }
    j["readers"].push_back({{"name", s.name},
                            {"state", scard::state_text(s.desk_state)},
                            {"card_present", (s.desk_state & scard::kStatePresent) != 0},
                            {"atr", to_hex(s.atr, false)},
                            {"event_count", s.event_count},
                            {"image", image}});
  }
  const auto& st = core.stats();
  j["clients"] = core.client_count();
  j["handles"] = core.handle_count();
  j["stats"] = {{"client_connections", st.client_connections},
                {"client_requests", st.client_requests},
                {"desk_requests", st.desk_requests},
                {"round_trips", st.round_trips},
                {"pipelined", st.pipelined},
                {"deferred_begins", st.deferred_begins},
                {"prefetch_hits", st.prefetch_hits},
                {"prefetch_discarded", st.prefetch_discarded},
                {"attribute_cache_hits", st.attribute_cache_hits},
                {"local_answers", st.local_answers},
                {"image_answers", st.image_answers},
                {"image_preludes", st.image_preludes},
                {"images_received", st.images_received},
                {"images_dropped", st.images_dropped},
                {"protocol_errors", st.protocol_errors},
                {"desk_sessions", st.desk_sessions},
                {"desk_bytes_in", st.desk_bytes_in},
                {"desk_bytes_out", st.desk_bytes_out}};
  return j;
}

void ControlServer::handle(std::shared_ptr<transport::ByteStream> stream, const std::string& line) {
  auto reply = [&](const nlohmann::json& j) {
    stream->send([&] {
      auto text = j.dump() + "\n";
      return std::vector<uint8_t>(text.begin(), text.end());
    }());
    stream->close_after_flush("answered");
  };
  auto req = nlohmann::json::parse(line, nullptr, false);
  if (req.is_discarded() || !req.is_object() || !req.contains("cmd") || !req["cmd"].is_string()) {
    reply({{"error", "expected {\"cmd\": ...}"}});
    return;
  }
  const auto cmd = req["cmd"].get<std::string>();
  if (cmd == "status") {
    reply(status(core_, info_));
  } else if (cmd == "audit") {
    reply({{"events", audit_ ? audit_() : nlohmann::json::array()}});
  } else if (cmd == "ping") {
    int count = req.value("count", 10);
    count = std::clamp(count, 1, kMaxPings);
    run_pings(stream, count, {});
  } else {
    reply({{"error", "unknown command '" + log::printable(cmd) + "'"}});
  }
}

void ControlServer::run_pings(std::shared_ptr<transport::ByteStream> stream, int remaining, std::vector<double> samples) {
  if (remaining == 0) {
    nlohmann::json j;
    std::sort(samples.begin(), samples.end());
    j["count"] = samples.size();
    if (!samples.empty()) {
      j["median_us"] = samples[samples.size() / 2];
      j["p99_us"] = samples[std::min(samples.size() - 1, samples.size() * 99 / 100)];
      j["max_us"] = samples.back();
    }
    auto text = j.dump() + "\n";
    stream->send(std::vector<uint8_t>(text.begin(), text.end()));
    stream->close_after_flush("answered");
    return;
  }
  auto t0 = std::chrono::steady_clock::now();
  core_.ping_desk(t0, [this, stream, remaining, samples = std::move(samples), t0,
                   alive = std::weak_ptr<bool>(alive_)](bool ok) mutable {
    if (alive.expired()) return;
    if (!ok) {
      auto text = nlohmann::json{{"error", "desk not connected"}, {"count", samples.size()}}.dump() + "\n";
      stream->send(std::vector<uint8_t>(text.begin(), text.end()));
      stream->close_after_flush("answered");
      return;
    }
    samples.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
    // Continue from the io_context, not from inside the core's reply handling.
    boost::asio::post(io_, [this, stream, remaining, samples = std::move(samples), alive]() mutable {
      if (!alive.expired()) run_pings(stream, remaining - 1, std::move(samples));
    });
  });
}

}  // namespace cardbridge::shim
