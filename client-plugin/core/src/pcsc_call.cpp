#include "cardbridge/desk_core/pcsc_call.hpp"

#include "cardbridge/support/log.hpp"
#include "cardbridge/support/scard.hpp"

namespace cardbridge::client {

namespace sc = cardbridge::scard;

namespace {
log::Channel logger{"cardbridge.desk"};

template <class... F>
struct Overload : F... {
  using F::operator()...;
};
template <class... F>
Overload(F...) -> Overload<F...>;
}  // namespace

const char* call_name(const PcscCall& c) {
  static constexpr const char* kNames[] = {"SCardEstablishContext", "SCardReleaseContext", "SCardConnect",
                                           "SCardReconnect", "SCardDisconnect", "SCardBeginTransaction",
                                           "SCardEndTransaction", "SCardTransmit", "SCardControl",
                                           "SCardGetAttrib", "SCardSetAttrib", "SCardStatus"};
  return kNames[c.index()];
}

CallResult run_call(CardApi& api, const PcscCall& c) noexcept {
  CallResult r;
  try {
    std::visit(Overload{
                   [&](const call::Establish&) { r.rv = api.establish(sc::kScopeSystem, &r.ctx); },
                   [&](const call::Release& k) { r.rv = api.release(k.ctx); },
                   [&](const call::Connect& k) {
                     r.rv = api.connect(k.ctx, k.reader, k.share_mode, k.protocols, &r.card, &r.protocol);
                   },
                   [&](const call::Reconnect& k) {
                     r.rv = api.reconnect(k.card, k.share_mode, k.protocols, k.initialization, &r.protocol);
                   },
                   [&](const call::Disconnect& k) { r.rv = api.disconnect(k.card, k.disposition); },
                   [&](const call::Begin& k) { r.rv = api.begin_transaction(k.card); },
                   [&](const call::End& k) { r.rv = api.end_transaction(k.card, k.disposition); },
                   [&](const call::Transmit& k) {
                     uint32_t recv_protocol = k.recv_protocol;
                     Buffer out;
                     r.rv = api.transmit(k.card, k.send_protocol, k.command, &recv_protocol, k.recv_capacity, &out);
                     r.protocol = recv_protocol;
                     r.length = out.length;
                     r.data = std::move(out.data);
                   },
                   [&](const call::Control& k) {
                     Buffer out;
                     r.rv = api.control(k.card, k.code, k.data, k.recv_capacity, &out);
                     r.length = out.length;
                     r.data = std::move(out.data);
                   },
                   [&](const call::GetAttrib& k) {
                     Buffer out;
                     r.rv = api.get_attrib(k.card, k.attr, k.capacity, &out);
                     r.length = out.length;
                     r.data = std::move(out.data);
                   },
                   [&](const call::SetAttrib& k) { r.rv = api.set_attrib(k.card, k.attr, k.value); },
                   [&](const call::Status& k) { r.rv = api.status(k.card, &r.reader, &r.state, &r.protocol, &r.atr); },
               },
               c);
    if (r.rv != sc::kSuccess) r.data.clear();
  } catch (const std::exception& e) {
    logger->error("internal error in {}: {}", call_name(c), e.what());
    r = CallResult{};
    r.rv = sc::kFInternalError;
  } catch (...) {
    logger->error("internal error in {} (unknown exception)", call_name(c));
    r = CallResult{};
    r.rv = sc::kFInternalError;
  }
  return r;
}

}  // namespace cardbridge::client
