// DeskCore's private parts, shared by its three source files (desk_core.cpp: the link and
// the requests' lanes; desk_core_steps.cpp: each call's outcome, speculation and replies;
// desk_core_image.cpp: the card image). Not installed; nothing outside DeskCore includes it.
#pragma once

#include <array>
#include <deque>
#include <map>
#include <memory>
#include <optional>

#include <fmt/format.h>

#include "cardbridge/card_image/image.hpp"
#include "cardbridge/desk_core/desk_core.hpp"
#include "cardbridge/protocol/version.hpp"
#include "cardbridge/support/check.hpp"
#include "cardbridge/support/log.hpp"
#include "cardbridge/support/redact.hpp"
#include "cardbridge/support/scard.hpp"

namespace cardbridge::client {

namespace desk_detail {

namespace sc = cardbridge::scard;
namespace pr = cardbridge::protocol;
namespace ci = cardbridge::card_image;

inline log::Channel logger{"cardbridge.desk"};

// Room for a reader's feature list: 6 bytes per feature, some twenty features defined.
inline constexpr uint32_t kFeatureAnswerCapacity = 256;

// Room for a speculative answer: 256 data bytes and the status word.
inline constexpr uint32_t kSpeculativeCapacity = 258;

using card_image::is_9000;

}  // namespace desk_detail

// One server request on its way through a lane.
struct DeskCore::Task {
  enum class Step {
    kEstablish,     // making the lane's PC/SC context
    kBegin,         // the deferred BeginTransaction the request carries
    kOperation,     // the request's own call
    kReestablish,   // Connect after the desk's pcscd restarted: release, establish, connect again
    kStatus,        // SCardStatus after a Connect/Reconnect (state, ATR, protocol for the shim)
    kSpeculate,     // a speculative Transmit
    kRelease,       // the server's ReleaseContext
    kPrelude,       // a Transmit's prelude (card image): one of the SELECTs before the command
    kImageCheck,    // a Connect with kWantImage: the card's update marker read again
    kFeatures,      // CM_IOCTL_GET_FEATURE_REQUEST, asked before a PIN-pad control code (policy)
  };
  uint32_t id = 0;
  protocol::Request req;
  Step step = Step::kOperation;
  protocol::Reply reply;
  ScardHandle card = 0;
  int reestablish = 0;   // 1: releasing the dead context, 2: establishing a new one
  // Speculation (Transmit): the command in flight, the reads still predicted, bytes read.
  Bytes spec_command;
  bool spec_reads_planned = false;
  std::deque<Bytes> spec_reads;
  std::size_t spec_bytes = 0;
  bool begun = false;     // the deferred Begin was made
  // The card image.
  std::size_t prelude_i = 0;
  std::optional<ImageStore::Held> image;  // Connect: the image to send
  std::vector<Bytes> check_cmds;          // Connect: Begin, these (SELECT, READs), End
  std::size_t check_i = 0;                // 0: Begin; 1..n: check_cmds; n+1: End
  Bytes check_data;
  bool check_ok = true;
};

// What programs did to the card in a reader (one insertion): the current file of each
// channel, with what its FCP said, and whether a PIN was presented since the card was last
// reset. The learning side of the card image.
struct DeskCore::CardWatch {
  uint32_t event_count = 0;
  Bytes atr;
  bool secure = false;  // a VERIFY (or authentication) succeeded since insertion or reset
  struct Channel {
    std::optional<ImageKey> key;
    std::optional<card_image::FileInfo> info;
    bool awaiting_fcp = false;  // the SELECT said 61xx: its FCP comes with GET RESPONSE
  };
  std::array<Channel, 20> channels;
};

// One imaging pass, on a lane of its own.
struct DeskCore::Imaging {
  LaneId lane = 0;
  std::unique_ptr<Imager> imager;
  bool in_call = false;
  bool voided = false;  // the image was dropped meanwhile: keep nothing of this pass
  uint64_t activity = 0;  // the reader's program activity (every link's) when the pass began
  std::optional<TimePoint> wait_until;
};

struct DeskCore::Lane {
  LaneId id = 0;
  uint32_t context = 0;                // the server's context id
  std::optional<ScardContext> ctx;     // the PC/SC context, once made
  std::deque<Task> queue;              // front: the task in progress when |running|
  bool running = false;
  bool in_call = false;                // a call is at the edge
  bool retired = false;                // the session is gone: no more replies; release and close
  bool releasing = false;              // the retirement's SCardReleaseContext is at the edge
  std::map<uint32_t, CardTrack> tracks;  // per desk handle: what speculation needs
};

}  // namespace cardbridge::client
