#include "fake_card_api.hpp"

#include <algorithm>
#include <stdexcept>

#include "cardbridge/support/scard.hpp"

namespace cardbridge::client::fake {

namespace sc = cardbridge::scard;

namespace {

constexpr std::size_t idx(Call c) { return static_cast<std::size_t>(c); }
constexpr uint32_t kInfinite = 0xFFFFFFFF;

bool valid_share(uint32_t share) {
  return share == sc::kShareExclusive || share == sc::kShareShared || share == sc::kShareDirect;
}

bool resets(uint32_t disposition) { return disposition == sc::kResetCard || disposition == sc::kUnpowerCard; }

// An answer of |bytes| into a caller's buffer of |capacity|: the length is always reported.
uint32_t answer(Buffer* out, std::vector<uint8_t> bytes, uint32_t capacity) {
  out->length = static_cast<uint32_t>(bytes.size());
  if (bytes.size() > capacity) return sc::kEInsufficientBuffer;
  out->data = std::move(bytes);
  return sc::kSuccess;
}

}  // namespace

// ---- the world ----------------------------------------------------------------------------

void FakeCardApi::add_reader(const std::string& name) {
  Lock lock(mu_);
  if (find_reader(name)) return;
  readers_.push_back(Reader{name, std::nullopt, 0, 0, {}, {}, 0});
  notify();
}

void FakeCardApi::remove_reader(const std::string& name) {
  Lock lock(mu_);
  std::erase_if(readers_, [&](const Reader& r) { return r.name == name; });
  notify();
}

void FakeCardApi::insert_card(const std::string& reader, FakeCard card) {
  Lock lock(mu_);
  Reader* r = find_reader(reader);
  if (!r) throw std::logic_error("fake: no reader " + reader);
  // A card replacing another one is a removal and an insertion: two events.
  r->events = static_cast<uint16_t>(r->events + (r->card ? 2 : 1));
  r->card = std::move(card);
  ++r->card_generation;
  r->transaction = 0;
  notify();
}

void FakeCardApi::remove_card(const std::string& reader) {
  Lock lock(mu_);
  Reader* r = find_reader(reader);
  if (!r) throw std::logic_error("fake: no reader " + reader);
  if (!r->card) return;
  r->card.reset();
  ++r->card_generation;
  r->events = static_cast<uint16_t>(r->events + 1);
  r->transaction = 0;
  notify();
}

void FakeCardApi::set_attribute(const std::string& reader, uint32_t attr, std::vector<uint8_t> value) {
  Lock lock(mu_);
  Reader* r = find_reader(reader);
  if (!r) throw std::logic_error("fake: no reader " + reader);
  r->attributes[attr] = std::move(value);
}

void FakeCardApi::set_control_answer(const std::string& reader, uint32_t code, std::vector<uint8_t> answer) {
  Lock lock(mu_);
  Reader* r = find_reader(reader);
  if (!r) throw std::logic_error("fake: no reader " + reader);
  r->control_answers[code] = std::move(answer);
}

void FakeCardApi::set_service_available(bool up) {
  Lock lock(mu_);
  if (up == service_up_) return;
  service_up_ = up;
  if (!up) {
    ++service_epoch_;
    for (auto& [id, h] : handles_) h.live = false;
    for (auto& r : readers_) r.transaction = 0;
  }
  notify();
}

// ---- fault injection ----------------------------------------------------------------------

void FakeCardApi::throw_once(Call c, Throw kind) {
  Lock lock(mu_);
  throw_[idx(c)] = kind;
}

void FakeCardApi::hold(Call c) {
  Lock lock(mu_);
  held_[idx(c)] = true;
}

void FakeCardApi::release_hold(Call c) {
  Lock lock(mu_);
  held_[idx(c)] = false;
  notify();
}

void FakeCardApi::enter(Lock& lock, Call c) {
  const auto i = idx(c);
  ++calls_[i];
  notify();
  if (throw_[i]) {
    const Throw kind = *throw_[i];
    throw_[i].reset();
    if (kind == Throw::kStd) throw std::runtime_error("fake: injected failure");
    throw 42;  // NOLINT: deliberately not a std::exception
  }
  while (held_[i]) {
    ++waiting_in_hold_[i];
    notify();
    changed_.wait(lock);
    --waiting_in_hold_[i];
  }
}

// ---- inspection ---------------------------------------------------------------------------

std::size_t FakeCardApi::calls(Call c) const {
  Lock lock(mu_);
  return calls_[idx(c)];
}

std::vector<ContextInfo> FakeCardApi::contexts() const {
  Lock lock(mu_);
  std::vector<ContextInfo> out;
  for (const auto& [id, c] : contexts_) out.push_back(ContextInfo{id, c.live && c.service_epoch == service_epoch_, c.watcher});
  return out;
}

std::vector<ScardHandle> FakeCardApi::live_handles() const {
  Lock lock(mu_);
  std::vector<ScardHandle> out;
  for (const auto& [id, h] : handles_) {
    if (h.live) out.push_back(id);
  }
  return out;
}

std::vector<ScardContext> FakeCardApi::released() const {
  Lock lock(mu_);
  return released_;
}

std::size_t FakeCardApi::live_worker_contexts_locked() const {
  return static_cast<std::size_t>(std::count_if(contexts_.begin(), contexts_.end(), [&](const auto& kv) {
    return kv.second.live && !kv.second.watcher && kv.second.service_epoch == service_epoch_;
  }));
}

std::size_t FakeCardApi::live_worker_contexts() const {
  Lock lock(mu_);
  return live_worker_contexts_locked();
}

std::size_t FakeCardApi::blocked_in_begin() const {
  Lock lock(mu_);
  return blocked_in_begin_;
}

std::vector<uint8_t> FakeCardApi::last_command() const {
  Lock lock(mu_);
  return last_command_;
}

uint32_t FakeCardApi::last_send_protocol() const {
  Lock lock(mu_);
  return last_send_protocol_;
}

uint16_t FakeCardApi::event_counter(const std::string& reader) const {
  Lock lock(mu_);
  const Reader* r = find_reader(reader);
  return r ? r->events : 0;
}

std::optional<ScardHandle> FakeCardApi::transaction_holder(const std::string& reader) const {
  Lock lock(mu_);
  const Reader* r = find_reader(reader);
  if (!r || r->transaction == 0) return std::nullopt;
  return r->transaction;
}

bool FakeCardApi::wait_calls(Call c, std::size_t n, std::chrono::milliseconds timeout) const {
  return wait(timeout, [&] { return calls_[idx(c)] >= n; });
}

bool FakeCardApi::wait_held(Call c, std::size_t n, std::chrono::milliseconds timeout) const {
  return wait(timeout, [&] { return waiting_in_hold_[idx(c)] >= n; });
}

bool FakeCardApi::wait_blocked_in_begin(std::size_t n, std::chrono::milliseconds timeout) const {
  return wait(timeout, [&] { return blocked_in_begin_ >= n; });
}

bool FakeCardApi::wait_released(std::size_t n, std::chrono::milliseconds timeout) const {
  return wait(timeout, [&] { return released_.size() >= n; });
}

bool FakeCardApi::wait_live_worker_contexts(std::size_t n, std::chrono::milliseconds timeout) const {
  return wait(timeout, [&] { return live_worker_contexts_locked() == n; });
}

bool FakeCardApi::wait_context_released(ScardContext ctx, std::chrono::milliseconds timeout) const {
  return wait(timeout, [&] { return std::find(released_.begin(), released_.end(), ctx) != released_.end(); });
}

bool FakeCardApi::wait_watcher_idle(std::chrono::milliseconds timeout) const {
  return wait(timeout, [&] {
    return std::any_of(contexts_.begin(), contexts_.end(),
                       [&](const auto& kv) { return kv.second.idle_at == generation_; });
  });
}

// ---- helpers ------------------------------------------------------------------------------

FakeCardApi::Reader* FakeCardApi::find_reader(const std::string& name) {
  auto it = std::find_if(readers_.begin(), readers_.end(), [&](const Reader& r) { return r.name == name; });
  return it == readers_.end() ? nullptr : &*it;
}

const FakeCardApi::Reader* FakeCardApi::find_reader(const std::string& name) const {
  auto it = std::find_if(readers_.begin(), readers_.end(), [&](const Reader& r) { return r.name == name; });
  return it == readers_.end() ? nullptr : &*it;
}

uint32_t FakeCardApi::check_context(ScardContext ctx) const {
  if (!service_up_) return sc::kENoService;
  auto it = contexts_.find(ctx);
  if (it == contexts_.end() || !it->second.live) return sc::kEInvalidHandle;
  if (it->second.service_epoch != service_epoch_) return sc::kENoService;
  return sc::kSuccess;
}

uint32_t FakeCardApi::pending_event(Handle& h, const Reader& r) {
  if (card_gone(h, r)) return sc::kWRemovedCard;
  if (h.reset_pending) {
    h.reset_pending = false;
    return sc::kWResetCard;
  }
  return sc::kSuccess;
}

uint32_t FakeCardApi::check_handle(ScardHandle card, Handle** h, Reader** r) {
  if (!service_up_) return sc::kENoService;
  auto it = handles_.find(card);
  if (it == handles_.end() || !it->second.live) return sc::kEInvalidHandle;
  if (auto rv = check_context(it->second.ctx); rv != sc::kSuccess) return rv;
  Reader* reader = find_reader(it->second.reader);
  if (!reader) return sc::kEReaderUnavailable;
  *h = &it->second;
  *r = reader;
  return sc::kSuccess;
}

// pcsc-lite's dwEventState for a reader: SCARD_STATE_* | event counter << 16.
uint32_t FakeCardApi::reader_event_state(const Reader& r) const {
  uint32_t s = 0;
  if (!r.card) {
    s = sc::kStateEmpty;
  } else {
    s = sc::kStatePresent;
    if (r.card->mute) s |= sc::kStateMute;
    bool any = false, exclusive = false;
    for (const auto& [id, h] : handles_) {
      if (!h.live || h.reader != r.name) continue;
      any = true;
      exclusive = exclusive || h.share == sc::kShareExclusive;
    }
    if (exclusive) {
      s |= sc::kStateExclusive;
    } else if (any) {
      s |= sc::kStateInUse;
    }
  }
  return s | (uint32_t{r.events} << 16);
}

void FakeCardApi::drop_handle(ScardHandle id, Handle& h) {
  h.live = false;
  if (Reader* r = find_reader(h.reader); r && r->transaction == id) r->transaction = 0;
}

void FakeCardApi::reset_others(const Handle& self, ScardHandle self_id) {
  for (auto& [id, h] : handles_) {
    if (id != self_id && h.live && h.reader == self.reader) h.reset_pending = true;
  }
}

// ---- CardApi ------------------------------------------------------------------------------

uint32_t FakeCardApi::establish(uint32_t scope, ScardContext* ctx) {
  Lock lock(mu_);
  enter(lock, Call::kEstablish);
  if (!service_up_) return sc::kENoService;
  if (scope > sc::kScopeGlobal) return sc::kEInvalidValue;
  *ctx = next_context_++;
  contexts_[*ctx] = Context{true, false, service_epoch_, 0};
  notify();
  return sc::kSuccess;
}

uint32_t FakeCardApi::release(ScardContext ctx) {
  Lock lock(mu_);
  enter(lock, Call::kRelease);
  if (auto rv = check_context(ctx); rv != sc::kSuccess) return rv;
  contexts_[ctx].live = false;
  for (auto& [id, h] : handles_) {
    if (h.live && h.ctx == ctx) drop_handle(id, h);
  }
  released_.push_back(ctx);
  notify();
  return sc::kSuccess;
}

uint32_t FakeCardApi::list_readers(ScardContext ctx, std::vector<std::string>* readers) {
  Lock lock(mu_);
  enter(lock, Call::kListReaders);
  readers->clear();
  if (auto rv = check_context(ctx); rv != sc::kSuccess) return rv;
  contexts_[ctx].watcher = true;
  for (const auto& r : readers_) readers->push_back(r.name);
  return sc::kSuccess;  // no readers: success with an empty list (the CardApi contract)
}

uint32_t FakeCardApi::get_status_change(ScardContext ctx, uint32_t timeout_ms, std::vector<ReaderStateIo>& states) {
  Lock lock(mu_);
  enter(lock, Call::kGetStatusChange);
  if (auto rv = check_context(ctx); rv != sc::kSuccess) return rv;
  contexts_[ctx].watcher = true;
  const uint64_t cancels = contexts_[ctx].cancels;
  const uint64_t epoch = contexts_[ctx].service_epoch;
  // Whatever way this call returns, it no longer watches.
  struct Unwatch {
    std::map<ScardContext, Context>& contexts;
    ScardContext ctx;
    ~Unwatch() { contexts[ctx].idle_at.reset(); }
  } unwatch{contexts_, ctx};
  const auto deadline = timeout_ms == kInfinite ? std::chrono::steady_clock::time_point::max()
                                                : std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    if (!service_up_ || epoch != service_epoch_) return sc::kENoService;
    const Context& c = contexts_[ctx];
    if (!c.live) return sc::kEInvalidHandle;
    if (c.cancels != cancels) return sc::kECancelled;
    bool any = false;
    for (auto& s : states) {
      const uint32_t cur = s.current_state;
      s.atr.clear();
      if (cur & sc::kStateIgnore) {
        s.event_state = sc::kStateIgnore;
        continue;
      }
      uint32_t ev = 0;
      bool changed = false;
      if (s.name == kPnpReader) {
        ev = static_cast<uint32_t>(readers_.size()) << 16;
        changed = (cur & 0xFFFF0000u) != ev;
      } else if (const Reader* r = find_reader(s.name)) {
        ev = reader_event_state(*r);
        if (r->card) s.atr = r->card->atr;
        changed = cur == sc::kStateUnaware ||
                  (cur & ~(sc::kStateChanged | sc::kStateIgnore | sc::kStateAtrMatch)) != ev;
      } else {
        ev = sc::kStateUnknown;
        changed = !(cur & sc::kStateUnknown);
      }
      s.event_state = ev | (changed ? sc::kStateChanged : 0);
      any = any || changed;
    }
    if (any) return sc::kSuccess;
    if (timeout_ms == 0) return sc::kETimeout;
    // Announce (without bumping the generation) that this watcher is up to date.
    auto& idle_at = contexts_[ctx].idle_at;
    if (idle_at != generation_) {
      idle_at = generation_;
      changed_.notify_all();
    }
    if (changed_.wait_until(lock, deadline) == std::cv_status::timeout) return sc::kETimeout;
  }
}

uint32_t FakeCardApi::cancel(ScardContext ctx) {
  Lock lock(mu_);
  enter(lock, Call::kCancel);
  if (auto rv = check_context(ctx); rv != sc::kSuccess) return rv;
  ++contexts_[ctx].cancels;  // wakes a get_status_change in progress; none later
  notify();
  return sc::kSuccess;
}

uint32_t FakeCardApi::connect(ScardContext ctx, const std::string& reader, uint32_t share_mode, uint32_t protocols,
                              ScardHandle* card, uint32_t* active_protocol) {
  Lock lock(mu_);
  enter(lock, Call::kConnect);
  if (auto rv = check_context(ctx); rv != sc::kSuccess) return rv;
  Reader* r = find_reader(reader);
  if (!r) return sc::kEUnknownReader;
  if (!valid_share(share_mode)) return sc::kEInvalidValue;
  if (share_mode != sc::kShareDirect) {
    if (!r->card) return sc::kENoSmartcard;
    if (r->card->mute) return sc::kWUnresponsiveCard;
  }
  for (const auto& [id, h] : handles_) {
    if (!h.live || h.reader != reader) continue;
    if (h.share == sc::kShareExclusive || share_mode == sc::kShareExclusive) return sc::kESharingViolation;
  }
  uint32_t proto = 0;
  if (r->card && !(share_mode == sc::kShareDirect && protocols == 0)) {
    const uint32_t common = protocols & r->card->protocols;
    if (common & sc::kProtocolT1) {
      proto = sc::kProtocolT1;
    } else if (common & sc::kProtocolT0) {
      proto = sc::kProtocolT0;
    } else if (common & sc::kProtocolRaw) {
      proto = sc::kProtocolRaw;
    } else {
      return sc::kEProtoMismatch;
    }
  }
  const ScardHandle id = next_handle_++;
  handles_[id] = Handle{ctx, reader, share_mode, proto, r->card_generation, true, false};
  *card = id;
  *active_protocol = proto;
  notify();
  return sc::kSuccess;
}

uint32_t FakeCardApi::reconnect(ScardHandle card, uint32_t share_mode, uint32_t protocols, uint32_t initialization,
                                uint32_t* active_protocol) {
  Lock lock(mu_);
  enter(lock, Call::kReconnect);
  Handle* h = nullptr;
  Reader* r = nullptr;
  if (auto rv = check_handle(card, &h, &r); rv != sc::kSuccess) return rv;
  if (!valid_share(share_mode)) return sc::kEInvalidValue;
  if (!r->card) return sc::kENoSmartcard;
  for (const auto& [id, other] : handles_) {
    if (id == card || !other.live || other.reader != h->reader) continue;
    if (other.share == sc::kShareExclusive || share_mode == sc::kShareExclusive) return sc::kESharingViolation;
  }
  const uint32_t common = protocols & r->card->protocols;
  uint32_t proto = 0;
  if (common & sc::kProtocolT1) {
    proto = sc::kProtocolT1;
  } else if (common & sc::kProtocolT0) {
    proto = sc::kProtocolT0;
  } else if (share_mode != sc::kShareDirect) {
    return sc::kEProtoMismatch;
  }
  if (resets(initialization)) reset_others(*h, card);
  h->share = share_mode;
  h->protocol = proto;
  h->card_generation = r->card_generation;
  h->reset_pending = false;
  *active_protocol = proto;
  notify();
  return sc::kSuccess;
}

uint32_t FakeCardApi::disconnect(ScardHandle card, uint32_t disposition) {
  Lock lock(mu_);
  enter(lock, Call::kDisconnect);
  Handle* h = nullptr;
  Reader* r = nullptr;
  if (auto rv = check_handle(card, &h, &r); rv != sc::kSuccess) return rv;
  if (resets(disposition) && r->card && r->card_generation == h->card_generation) reset_others(*h, card);
  drop_handle(card, *h);
  notify();
  return sc::kSuccess;
}

uint32_t FakeCardApi::begin_transaction(ScardHandle card) {
  Lock lock(mu_);
  enter(lock, Call::kBeginTransaction);
  for (;;) {
    Handle* h = nullptr;
    Reader* r = nullptr;
    if (auto rv = check_handle(card, &h, &r); rv != sc::kSuccess) return rv;
    if (auto rv = pending_event(*h, *r); rv != sc::kSuccess) return rv;
    if (r->transaction == 0 || r->transaction == card) {
      r->transaction = card;
      notify();
      return sc::kSuccess;
    }
    // Another handle holds the card: wait, as libpcsclite does, until it lets go.
    ++blocked_in_begin_;
    notify();
    changed_.wait(lock);
    --blocked_in_begin_;
  }
}

uint32_t FakeCardApi::end_transaction(ScardHandle card, uint32_t disposition) {
  Lock lock(mu_);
  enter(lock, Call::kEndTransaction);
  Handle* h = nullptr;
  Reader* r = nullptr;
  if (auto rv = check_handle(card, &h, &r); rv != sc::kSuccess) return rv;
  if (r->transaction != card) return sc::kENotTransacted;
  r->transaction = 0;
  notify();
  if (card_gone(*h, *r)) return sc::kWRemovedCard;
  if (resets(disposition)) reset_others(*h, card);
  return sc::kSuccess;
}

uint32_t FakeCardApi::transmit(ScardHandle card, uint32_t send_protocol, std::span<const uint8_t> command,
                               uint32_t* recv_protocol, uint32_t recv_capacity, Buffer* response) {
  Lock lock(mu_);
  enter(lock, Call::kTransmit);
  response->data.clear();
  response->length = 0;
  Handle* h = nullptr;
  Reader* r = nullptr;
  if (auto rv = check_handle(card, &h, &r); rv != sc::kSuccess) return rv;
  if (auto rv = pending_event(*h, *r); rv != sc::kSuccess) return rv;
  if (r->transaction != 0 && r->transaction != card) return sc::kESharingViolation;
  if (send_protocol != h->protocol && send_protocol != sc::kProtocolAnyOld) return sc::kEProtoMismatch;
  last_command_.assign(command.begin(), command.end());
  last_send_protocol_ = send_protocol;
  const std::vector<uint8_t> key(command.begin(), command.end());
  auto it = r->card->answers.find(key);
  const auto& bytes = it == r->card->answers.end() ? r->card->default_answer : it->second;
  const uint32_t rv = answer(response, bytes, recv_capacity);
  if (rv == sc::kSuccess) *recv_protocol = h->protocol;
  return rv;
}

uint32_t FakeCardApi::control(ScardHandle card, uint32_t code, std::span<const uint8_t> /*in*/, uint32_t recv_capacity,
                              Buffer* out) {
  Lock lock(mu_);
  enter(lock, Call::kControl);
  out->data.clear();
  out->length = 0;
  Handle* h = nullptr;
  Reader* r = nullptr;
  if (auto rv = check_handle(card, &h, &r); rv != sc::kSuccess) return rv;
  auto it = r->control_answers.find(code);
  if (it == r->control_answers.end()) return sc::kEUnsupportedFeature;
  return answer(out, it->second, recv_capacity);
}

uint32_t FakeCardApi::get_attrib(ScardHandle card, uint32_t attr, uint32_t capacity, Buffer* out) {
  Lock lock(mu_);
  enter(lock, Call::kGetAttrib);
  out->data.clear();
  out->length = 0;
  Handle* h = nullptr;
  Reader* r = nullptr;
  if (auto rv = check_handle(card, &h, &r); rv != sc::kSuccess) return rv;
  std::vector<uint8_t> value;
  if (attr == sc::kAttrAtrString) {
    if (card_gone(*h, *r)) return sc::kWRemovedCard;
    value = r->card->atr;
  } else {
    auto it = r->attributes.find(attr);
    if (it == r->attributes.end()) return sc::kEUnsupportedFeature;
    value = it->second;
  }
  return answer(out, std::move(value), capacity);
}

uint32_t FakeCardApi::set_attrib(ScardHandle card, uint32_t attr, std::span<const uint8_t> value) {
  Lock lock(mu_);
  enter(lock, Call::kSetAttrib);
  Handle* h = nullptr;
  Reader* r = nullptr;
  if (auto rv = check_handle(card, &h, &r); rv != sc::kSuccess) return rv;
  r->attributes[attr].assign(value.begin(), value.end());
  return sc::kSuccess;
}

uint32_t FakeCardApi::status(ScardHandle card, std::string* reader, uint32_t* state, uint32_t* protocol,
                             std::vector<uint8_t>* atr) {
  Lock lock(mu_);
  enter(lock, Call::kStatus);
  Handle* h = nullptr;
  Reader* r = nullptr;
  if (auto rv = check_handle(card, &h, &r); rv != sc::kSuccess) return rv;
  *reader = r->name;
  *protocol = h->protocol;
  const uint32_t counter = uint32_t{r->events} << 16;
  if (card_gone(*h, *r)) {
    *state = counter | sc::kReaderAbsent;
    atr->clear();
    return sc::kWRemovedCard;
  }
  *state = counter | sc::kReaderPresent | sc::kReaderPowered |
           (h->protocol != 0 ? sc::kReaderSpecific : sc::kReaderNegotiable);
  *atr = r->card->atr;
  return sc::kSuccess;
}

}  // namespace cardbridge::client::fake
