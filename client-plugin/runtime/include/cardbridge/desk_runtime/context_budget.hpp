// ContextBudget: how many PC/SC contexts a desk program (the desk agent, with every server
// connection it serves) may hold at the desk's pcscd, shared by all of its links.
//
// Why: pcscd serves at most 200 contexts in all (PCSC_MAX_CONTEXT_THREADS, for every
// program of the desk together: one client connection each); past it, it closes new
// connections and *every* PC/SC program at the desk fails. The agent keeps below its
// budget (default 150 of the 200: docs/security.md) so the desk's own programs always have room.
//
// Thread-safe (links run on their own threads); no I/O, no clock.
//
// BudgetedCardApi: a CardApi that takes one unit of a ContextBudget for each context it
// establishes and gives it back when the context is released. A refused establish answers
// SCARD_E_NO_MEMORY, what pcscd answers a client past its own per-client context limit, and
// never reaches the desk's pcscd. The first refusal of an episode is a warning (with the
// limit and how to raise it), the rest are quiet until the budget has room again (one info
// line): a program retrying in a loop does not flood the log.
#pragma once

#include <cstddef>
#include <mutex>
#include <set>

#include "cardbridge/desk_core/card_api.hpp"

namespace cardbridge::client {

// pcscd's limit on contexts, all programs of the desk together (pcsc-lite
// PCSC_MAX_CONTEXT_THREADS), and the agent's default share of it.
inline constexpr std::size_t kDeskPcscdContexts = 200;
inline constexpr std::size_t kDefaultContextBudget = 150;

class ContextBudget {
 public:
  explicit ContextBudget(std::size_t limit) : limit_(limit) {}
  ContextBudget(const ContextBudget&) = delete;
  ContextBudget& operator=(const ContextBudget&) = delete;

  struct Acquired {
    bool ok = false;
    // A refusal that starts an episode (the first since the budget was last below its
    // limit): the caller says so loudly; the next refusals of the episode are quiet.
    bool first_refusal = false;
  };
  Acquired try_acquire() {
    std::lock_guard lock(mu_);
    if (in_use_ < limit_) {
      ++in_use_;
      return {true, false};
    }
    ++refused_;
    const bool first = !exhausted_;
    exhausted_ = true;
    return {false, first};
  }
  // Returns one context. True when this ends a refusal episode (worth a log line).
  bool release() {
    std::lock_guard lock(mu_);
    if (in_use_ > 0) --in_use_;
    if (exhausted_ && in_use_ < limit_) {
      exhausted_ = false;
      return true;
    }
    return false;
  }
  std::size_t limit() const { return limit_; }
  std::size_t in_use() const {
    std::lock_guard lock(mu_);
    return in_use_;
  }
  std::size_t refused() const {
    std::lock_guard lock(mu_);
    return refused_;
  }

 private:
  const std::size_t limit_;
  mutable std::mutex mu_;
  std::size_t in_use_ = 0;
  std::size_t refused_ = 0;
  bool exhausted_ = false;
};

class BudgetedCardApi final : public CardApi {
 public:
  // |inner| and |budget| must outlive this object.
  BudgetedCardApi(CardApi& inner, ContextBudget& budget) : inner_(inner), budget_(budget) {}

  uint32_t establish(uint32_t scope, ScardContext* ctx) override;
  uint32_t release(ScardContext ctx) override;
  uint32_t list_readers(ScardContext ctx, std::vector<std::string>* readers) override {
    return inner_.list_readers(ctx, readers);
  }
  uint32_t get_status_change(ScardContext ctx, uint32_t timeout_ms, std::vector<ReaderStateIo>& states) override {
    return inner_.get_status_change(ctx, timeout_ms, states);
  }
  uint32_t cancel(ScardContext ctx) override { return inner_.cancel(ctx); }
  uint32_t connect(ScardContext ctx, const std::string& reader, uint32_t share_mode, uint32_t protocols,
                   ScardHandle* card, uint32_t* active_protocol) override {
    return inner_.connect(ctx, reader, share_mode, protocols, card, active_protocol);
  }
  uint32_t reconnect(ScardHandle card, uint32_t share_mode, uint32_t protocols, uint32_t initialization,
                     uint32_t* active_protocol) override {
    return inner_.reconnect(card, share_mode, protocols, initialization, active_protocol);
  }
  uint32_t disconnect(ScardHandle card, uint32_t disposition) override { return inner_.disconnect(card, disposition); }
  uint32_t begin_transaction(ScardHandle card) override { return inner_.begin_transaction(card); }
  uint32_t end_transaction(ScardHandle card, uint32_t disposition) override {
    return inner_.end_transaction(card, disposition);
  }
  uint32_t transmit(ScardHandle card, uint32_t send_protocol, std::span<const uint8_t> command, uint32_t* recv_protocol,
                    uint32_t recv_capacity, Buffer* response) override {
    return inner_.transmit(card, send_protocol, command, recv_protocol, recv_capacity, response);
  }
  uint32_t control(ScardHandle card, uint32_t code, std::span<const uint8_t> in, uint32_t recv_capacity,
                   Buffer* out) override {
    return inner_.control(card, code, in, recv_capacity, out);
  }
  uint32_t get_attrib(ScardHandle card, uint32_t attr, uint32_t capacity, Buffer* out) override {
    return inner_.get_attrib(card, attr, capacity, out);
  }
  uint32_t set_attrib(ScardHandle card, uint32_t attr, std::span<const uint8_t> value) override {
    return inner_.set_attrib(card, attr, value);
  }
  uint32_t status(ScardHandle card, std::string* reader, uint32_t* state, uint32_t* protocol,
                  std::vector<uint8_t>* atr) override {
    return inner_.status(card, reader, state, protocol, atr);
  }

 private:
  CardApi& inner_;
  ContextBudget& budget_;
  std::mutex mu_;
  std::set<ScardContext> held_;  // contexts established through us and not released yet
};

}  // namespace cardbridge::client
