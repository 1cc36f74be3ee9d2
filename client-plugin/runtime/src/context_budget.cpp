#include "cardbridge/desk_runtime/context_budget.hpp"

#include "cardbridge/support/log.hpp"
#include "cardbridge/support/scard.hpp"

namespace cardbridge::client {

namespace {
log::Channel logger{"cardbridge.desk.budget"};
}  // namespace

uint32_t BudgetedCardApi::establish(uint32_t scope, ScardContext* ctx) {
  const auto got = budget_.try_acquire();
  if (!got.ok) {
    if (got.first_refusal) {
      logger->warn("PC/SC context limit reached: {} contexts at the desk's pcscd already (--max-contexts {}; "
                   "pcscd serves {} for every program of the desk): new contexts refused with "
                   "SCARD_E_NO_MEMORY until one is released",
                   budget_.limit(), budget_.limit(), kDeskPcscdContexts);
    }
    return scard::kENoMemory;
  }
  const uint32_t rv = inner_.establish(scope, ctx);
  if (rv != scard::kSuccess) {
    budget_.release();
    return rv;
  }
  std::lock_guard lock(mu_);
  held_.insert(*ctx);
  return rv;
}

uint32_t BudgetedCardApi::release(ScardContext ctx) {
  const uint32_t rv = inner_.release(ctx);
  bool ours = false;
  {
    std::lock_guard lock(mu_);
    ours = held_.erase(ctx) > 0;
  }
  // Whatever pcscd answered, the context is gone for us (a failed release means pcscd no
  // longer knows it: restarted, or the context died with its connection).
  if (ours && budget_.release()) {
    logger->info("PC/SC context limit: room again ({} of {} in use)", budget_.in_use(), budget_.limit());
  }
  return rv;
}

}  // namespace cardbridge::client
