// DeskCore: the card image (what programs read is learned; the desk reads it while the card
// is unused; the image rides with a session's first Connect).
#include "desk_core_parts.hpp"

namespace cardbridge::client {

using namespace desk_detail;

// ---- the card image ------------------------------------------------------------------------

const std::string* DeskCore::reader_of(const pr::Request& r) const {
  switch (r.op) {
    case pr::Op::kConnect:
      return &r.reader;
    case pr::Op::kPing:
    case pr::Op::kEstablishContext:
    case pr::Op::kReleaseContext:
      return nullptr;
    default: {
      auto it = handles_.find(r.handle.value);
      return it == handles_.end() ? nullptr : &it->second.reader;
    }
  }
}

const pr::ReaderInfo* DeskCore::reader_info(const std::string& reader) const {
  for (const auto& r : monitor_readers_) {
    if (r.name == reader) return &r;
  }
  return nullptr;
}

uint32_t DeskCore::image_state(const std::string& reader) const {
  const auto* info = reader_info(reader);
  if (!info || !(info->state & sc::kStatePresent)) return pr::image_state::kNone;
  return images_->state(reader, info->event_count);
}

void DeskCore::touch(const std::string& reader) {
  if (!config_.card_image) return;
  images_->program_activity(reader);  // an imaging pass of another link yields too
  schedule_[reader].not_before = now_ + config_.image_idle_delay;
  auto it = imaging_.find(reader);
  if (it == imaging_.end() || it->second->imager->yielding()) return;
  logger->debug("reader '{}': a program wants the card; the imaging yields", log::printable(reader));
  it->second->imager->yield();
  if (!it->second->in_call) pump_imaging(*it->second);
}

void DeskCore::publish_busy() {
  if (!config_.card_image) return;
  std::set<std::string> readers;
  for (const auto& r : monitor_readers_) readers.insert(r.name);
  for (const auto& [id, h] : handles_) readers.insert(h.reader);
  for (const auto& reader : readers) images_->set_busy(reader, this, session_busy(reader));
}

bool DeskCore::session_busy(const std::string& reader) const {
  for (const auto& [id, h] : handles_) {
    if (h.reader == reader) return true;
  }
  for (const auto& [lid, lane] : lanes_) {
    for (const auto& t : lane->queue) {
      if (t.req.op == pr::Op::kConnect && t.req.reader == reader) return true;
    }
  }
  return false;
}

void DeskCore::consider_imaging() {
  imaging_wake_.reset();
  if (!config_.card_image || shutting_down_) return;
  for (const auto& r : monitor_readers_) {
    if (imaging_.contains(r.name)) continue;
    if (!(r.state & sc::kStatePresent) || (r.state & (sc::kStateMute | sc::kStateUnavailable | sc::kStateUnknown)) ||
        r.atr.empty())
      continue;
    // A desk program holding the card exclusively, or a program of this server using it.
    if ((r.state & sc::kStateExclusive) || session_busy(r.name) || images_->busy_elsewhere(r.name, this)) continue;
    ImagePlan plan = images_->plan(r.atr);
    if (plan.empty()) continue;  // nothing learned yet for cards of this type
    auto held = images_->image(r.name, r.event_count);
    if (held && held->complete && held->plan_version >= plan.version) continue;
    const auto& sched = schedule_[r.name];
    if (now_ < sched.not_before) {
      if (!imaging_wake_ || sched.not_before < *imaging_wake_) imaging_wake_ = sched.not_before;
      continue;
    }
    if (!images_->claim(r.name, this)) continue;  // another link of this desk is reading it
    auto im = std::make_unique<Imaging>();
    im->lane = next_lane_++;
    im->activity = images_->activity(r.name);
    logger->info("reader '{}': reading the card's image ({} SELECTs and {} files learned for its type{})",
                 log::printable(r.name), plan.selects.size(), plan.reads.size(),
                 held ? ", continuing" : "");
    std::optional<pr::CardImage> start;
    if (held) start = std::move(held->image);
    im->imager = std::make_unique<Imager>(r.name, r.event_count, r.atr, std::move(plan), std::move(start),
                                          config_.imager);
    ++stats_.image_passes;
    imaging_lanes_[im->lane] = r.name;
    Imaging& ref = *im;
    imaging_.emplace(r.name, std::move(im));
    pump_imaging(ref);
  }
}

void DeskCore::pump_imaging(Imaging& im) {
  CARDBRIDGE_CHECK(!im.in_call);
  im.wait_until.reset();
  // A program of any link of this desk asked for the card since the pass began: yield.
  if (!im.imager->yielding() && images_->activity(im.imager->reader()) != im.activity) im.imager->yield();
  auto action = im.imager->next(now_);
  if (auto* c = std::get_if<PcscCall>(&action)) {
    im.in_call = true;
    ++stats_.calls;
    if (std::holds_alternative<call::Transmit>(*c)) ++stats_.image_apdus;
    fx_.execute(im.lane, std::move(*c));
    return;
  }
  if (auto* w = std::get_if<Imager::Wait>(&action)) {
    im.wait_until = w->until;
    return;
  }
  finish_imaging(im.imager->reader());
}

void DeskCore::imaging_call_done(Imaging& im, CallResult r) {
  im.in_call = false;
  const auto before = im.imager->image().selects.size() + im.imager->image().files.size();
  im.imager->result(r, now_);
  const auto& image = im.imager->image();
  if (!im.voided && image.selects.size() + image.files.size() != before &&
      im.imager->outcome() != Imager::Outcome::kCardChanged) {
    // What is read is usable at once (a program may connect in the middle of the pass).
    ImageStore::Held held;
    held.event_count = im.imager->event_count();
    held.atr = im.imager->atr();
    held.image = image;
    held.plan_version = im.imager->plan_version();
    held.checked = now_;
    images_->put(im.imager->reader(), std::move(held));
    publish_readers();
  }
  pump_imaging(im);
}

void DeskCore::finish_imaging(const std::string& reader) {
  auto it = imaging_.find(reader);
  CARDBRIDGE_CHECK(it != imaging_.end());
  std::unique_ptr<Imaging> im = std::move(it->second);
  imaging_.erase(it);
  imaging_lanes_.erase(im->lane);
  images_->release(reader, this);
  const Imager& imager = *im->imager;
  for (const auto& key : imager.restricted()) images_->forget_read(imager.atr(), key);
  auto& sched = schedule_[reader];
  const auto outcome = imager.outcome();
  auto keep = [&](bool complete) {
    if (im->voided) return;
    const auto& image = imager.image();
    if (image.selects.empty() && image.files.empty()) return;
    ImageStore::Held held;
    held.event_count = imager.event_count();
    held.atr = imager.atr();
    held.image = image;
    held.image.complete = complete;
    held.plan_version = imager.plan_version();
    held.complete = complete;
    held.checked = now_;
    images_->put(reader, std::move(held));
  };
  auto back_off = [&] {
    sched.backoff = std::clamp(sched.backoff * 2, std::chrono::milliseconds{2000}, std::chrono::milliseconds{30000});
    sched.not_before = now_ + sched.backoff;
  };
  switch (outcome) {
    case Imager::Outcome::kComplete:
      keep(true);
      sched.backoff = {};
      logger->info("reader '{}': card image complete ({} SELECT answers, {} files, {} APDUs in this pass)",
                   log::printable(reader), imager.image().selects.size(), imager.image().files.size(),
                   imager.apdus());
      break;
    case Imager::Outcome::kYielded:
    case Imager::Outcome::kRunning:
      keep(false);
      logger->debug("reader '{}': imaging paused for a program ({} APDUs)", log::printable(reader), imager.apdus());
      break;
    case Imager::Outcome::kBusy:
      keep(false);
      back_off();
      logger->info("reader '{}': the card is held by another desk program; imaging again in {} ms",
                   log::printable(reader), sched.backoff.count());
      break;
    case Imager::Outcome::kFailed:
      keep(false);
      back_off();
      logger->info("reader '{}': imaging stopped by a PC/SC error; again in {} ms", log::printable(reader),
                   sched.backoff.count());
      break;
    case Imager::Outcome::kCardChanged:
      void_image(reader, "the card is not the one it was read from, or it changed while it was read");
      back_off();
      break;
  }
  fx_.lane_closed(im->lane);
  publish_readers();
  for (auto& [lid, lane] : lanes_) {
    if (!lane->running && !lane->in_call && !lane->queue.empty()) pump(*lane);  // an exclusive Connect may wait
  }
  consider_imaging();
}

void DeskCore::void_image(const std::string& reader, const char* why) {
  if (images_->void_image(reader)) {
    ++stats_.images_voided;
    logger->info("reader '{}': card image dropped: {}", log::printable(reader), why);
  }
  if (auto it = imaging_.find(reader); it != imaging_.end()) {
    it->second->voided = true;
    it->second->imager->yield();
  }
  publish_readers();
}

void DeskCore::card_reset_seen(const std::string& reader) {
  if (auto w = watches_.find(reader); w != watches_.end()) {
    w->second->secure = false;
    w->second->channels = {};
  }
}

void DeskCore::observe_card(const std::string& reader, std::span<const uint8_t> command, const CallResult& r,
                            bool program) {
  if (!config_.card_image || r.rv != sc::kSuccess || command.size() < 4) return;
  const auto* info = reader_info(reader);
  if (!info || !(info->state & sc::kStatePresent)) return;
  auto& w = watches_[reader];
  if (!w || w->event_count != info->event_count) {
    w = std::make_unique<CardWatch>();
    w->event_count = info->event_count;
    w->atr = info->atr;
  }
  const Bytes& resp = r.data;
  if (ci::may_modify(command)) {
    void_image(reader, "a command that may modify the card reached it");
    w->channels = {};
    return;
  }
  if (ci::raises_security(command, resp)) w->secure = true;
  const auto chn = ci::channel_of(command[0]);
  const bool gr = ci::is_get_response(command);
  if (!gr) {
    for (auto& ch : w->channels) ch.awaiting_fcp = false;
  }
  if (ci::loses_track(command, resp)) {
    if (command[1] == ci::kInsManageChannel || !chn) {
      w->channels = {};
    } else {
      w->channels[*chn] = {};
    }
    return;
  }
  if (ci::is_select(command)) {
    const auto outcome = ci::select_outcome(resp);
    const auto key = ci::select_key(command);
    const bool stateless_refusal =
        outcome == ci::SelectOutcome::kRefused && resp.size() == 2 &&
        (ci::status_word(resp) == 0x6E00 || ci::status_word(resp) == 0x6D00);
    if (program && ((key && outcome != ci::SelectOutcome::kUnclear) || stateless_refusal))
      images_->learn_select(w->atr, command);
    if (outcome == ci::SelectOutcome::kSelected && key && chn) {
      auto& ch = w->channels[*chn];
      ch = {};
      ch.key = key;
      if (resp.size() > 2 && ci::status_word(resp) == 0x9000)
        ch.info = ci::parse_fcp(std::span<const uint8_t>(resp.data(), resp.size() - 2));
      ch.awaiting_fcp = ci::more_data(resp);
    }
    return;
  }
  if (!chn) return;
  auto& ch = w->channels[*chn];
  if (gr) {
    if (ch.awaiting_fcp && resp.size() > 2 && ci::status_word(resp) == 0x9000)
      ch.info = ci::parse_fcp(std::span<const uint8_t>(resp.data(), resp.size() - 2));
    ch.awaiting_fcp = false;
    return;
  }
  auto rb = ci::read_binary(command);
  if (!rb || !program || !ch.key || !ch.info || ci::status_word(resp) != 0x9000) return;
  // Public: its FCP says READ BINARY needs nothing, or (no security attributes in the FCP)
  // the program read it before any PIN was presented on this card.
  const bool public_file = ch.info->read == ci::ReadAccess::kAlways ||
                           (ch.info->read == ci::ReadAccess::kUnknown && !w->secure);
  if (public_file && ch.info->transparent_ef && ch.info->size)
    images_->learn_read(w->atr, *ch.key, *ch.info->size, rb->le);
}

bool DeskCore::start_image_check(Lane& lane, Task& task) {
  const pr::Request& q = task.req;
  if (!config_.card_image || !link_.uses(pr::caps::kCardImage)) return false;
  const uint32_t event_count = (task.reply.state >> 16) & 0xFFFF;
  auto held = images_->image(q.reader, event_count);
  if (!held || (held->image.selects.empty() && held->image.files.empty())) return false;
  task.image = std::move(held);
  const auto marker = Imager::update_marker(task.image->atr, task.image->image);
  ci::ImageIndex index(task.image->image);
  const auto* way = marker ? index.way_to(*marker) : nullptr;
  const Bytes* content = marker ? index.file(*marker) : nullptr;
  if (!way || !content || now_ - task.image->checked < config_.image_recheck_after) {
    attach_image(task);
    return false;
  }
  // The image is old: read the card's update marker again before it goes.
  task.check_cmds = {way->command};
  const uint8_t ch = ci::key_channel(*marker);
  const uint8_t cla = ch < 4 ? ch : static_cast<uint8_t>(0x40 | (ch - 4));
  for (std::size_t off = 0; off < content->size(); off += 256) {
    const std::size_t n = std::min<std::size_t>(256, content->size() - off);
    task.check_cmds.push_back(Bytes{cla, ci::kInsReadBinary, static_cast<uint8_t>(off >> 8),
                                    static_cast<uint8_t>(off & 0xFF), static_cast<uint8_t>(n == 256 ? 0 : n)});
  }
  task.check_i = 0;
  task.step = Task::Step::kImageCheck;
  execute(lane, call::Begin{task.card});
  return true;
}

void DeskCore::attach_image(Task& task) {
  if (!task.image) return;
  const std::string& reader = task.req.reader;
  pr::CardImage image = std::move(task.image->image);
  image.complete = images_->state(reader, image.event_count) == pr::image_state::kComplete;
  logger->info("reader '{}': card image sent with the Connect reply ({} SELECT answers, {} files{})",
               log::printable(reader), image.selects.size(), image.files.size(), image.complete ? "" : ", partial");
  task.reply.image = std::move(image);
  task.image.reset();
  ++stats_.images_sent;
}


}  // namespace cardbridge::client
