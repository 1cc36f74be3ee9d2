#include "cardbridge/shim_io/desk_link.hpp"

#include "cardbridge/support/log.hpp"

namespace cardbridge::shim {

namespace {
log::Channel logger{"cardbridge.shim.desk"};
constexpr std::chrono::milliseconds kMinBackoff{100};
constexpr std::chrono::milliseconds kMaxBackoff{2000};
}  // namespace

StreamDeskLink::StreamDeskLink(boost::asio::io_context& io, transport::Endpoint ep)
    : io_(io), description_(ep.to_string()), retry_(io), health_every_(0), health_timer_(io) {
  connector_ = [&io, ep](auto done) {
    transport::async_connect(io, ep, [done](std::optional<transport::GenericSocket> sock, std::string err) {
      if (!sock) return done(nullptr, err);
      done(std::make_shared<transport::ByteStream>(std::move(*sock)), "");
    });
  };
}

Connector StreamDeskLink::tls_connector(boost::asio::io_context& io, transport::Endpoint ep, transport::TlsContext ctx,
                                        std::string peer_name) {
  return [&io, ep, ctx, peer_name](auto done) {
    transport::async_connect_tls(io, ep, ctx, peer_name,
                                 [done](std::shared_ptr<transport::Stream> s, PeerIdentity, std::string err) {
                                   done(std::move(s), std::move(err));
                                 });
  };
}

StreamDeskLink::StreamDeskLink(boost::asio::io_context& io, std::string description, Connector connector,
                               HealthCheck health, std::chrono::milliseconds health_every)
    : io_(io),
      description_(std::move(description)),
      connector_(std::move(connector)),
      retry_(io),
      health_(std::move(health)),
      health_every_(health_every),
      health_timer_(io) {}

void StreamDeskLink::start(Events events) {
  events_ = std::move(events);
  connect();
}

void StreamDeskLink::connect() {
  if (stopped_) return;
  std::weak_ptr<StreamDeskLink> weak = shared_from_this();
  connector_([weak](std::shared_ptr<transport::Stream> stream, std::string err) {
    auto self = weak.lock();
    if (!self || self->stopped_) return;
    if (!stream) {
      if (!self->warned_) {
        logger->warn("desk {} not reachable ({}); retrying", self->description_, err);
        self->warned_ = true;
      } else {
        logger->debug("desk {} not reachable ({})", self->description_, err);
      }
      self->schedule_retry();
      return;
    }
    self->warned_ = false;
    logger->info("connected to desk {}", self->description_);
    self->stream_ = std::move(stream);
    self->stream_->start(
        [weak](std::span<const uint8_t> data) {
          auto s = weak.lock();
          if (!s) return;
          s->backoff_ = kMinBackoff;  // the desk answers: after a loss, retry quickly
          if (s->events_.bytes) s->events_.bytes(data);
        },
        [weak](const std::string& reason) {
          auto s = weak.lock();
          if (!s) return;
          logger->info("desk {} connection closed: {}", s->description_, reason);
          s->stream_.reset();
          s->health_timer_.cancel();
          if (s->events_.down) s->events_.down(reason);
          s->schedule_retry();
        });
    self->arm_health();
    if (self->events_.up) self->events_.up(self->stream_->peer());
  });
}

void StreamDeskLink::arm_health() {
  if (!health_ || stopped_) return;
  health_timer_.expires_after(health_every_);
  std::weak_ptr<StreamDeskLink> weak = shared_from_this();
  health_timer_.async_wait([weak](boost::system::error_code ec) {
    auto s = weak.lock();
    if (ec || !s || s->stopped_ || !s->stream_) return;
    if (auto why = s->health_(); !why.empty()) {
      s->reset(why);
      return;
    }
    s->arm_health();
  });
}

void StreamDeskLink::schedule_retry() {
  if (stopped_) return;
  retry_.expires_after(backoff_);
  backoff_ = std::min(backoff_ * 2, kMaxBackoff);
  std::weak_ptr<StreamDeskLink> weak = shared_from_this();
  retry_.async_wait([weak](boost::system::error_code ec) {
    if (ec) return;
    if (auto s = weak.lock()) s->connect();
  });
}

void StreamDeskLink::send(std::vector<uint8_t> bytes) {
  if (stream_) stream_->send(std::move(bytes));
}

void StreamDeskLink::reset(const std::string& reason) {
  if (!stream_) return;
  logger->warn("dropping desk connection: {}", reason);
  health_timer_.cancel();
  stream_->close(reason);
  stream_.reset();
  if (events_.down) events_.down(reason);
  schedule_retry();
}

void StreamDeskLink::stop() {
  stopped_ = true;
  retry_.cancel();
  health_timer_.cancel();
  if (stream_) stream_->close("shutting down");
  stream_.reset();
}

}  // namespace cardbridge::shim
