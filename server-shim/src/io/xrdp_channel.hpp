// The desk link inside an xrdp session: the CBRIDGE virtual channel opened through
// xrdp's libxrdpapi (loaded at run time; it ships without a header). In xrdp 0.9 the
// channel's server end is a UNIX socket to the session's chansrv, which the library
// hands out (WTSVirtualChannelQuery/WTSVirtualFileHandle): we duplicate it and use it as
// an ordinary stream, so the shim's desk link code is the same as for a desk socket.
#pragma once

#include <string>

#include "io/desk_link.hpp"

namespace cardbridge::shim {

struct XrdpOptions {
  bool dynamic = false;        // WTS_CHANNEL_OPTION_DYNAMIC instead of a static channel
  std::string library;         // path of libxrdpapi.so.0; empty: the usual locations
  std::string channel = "CBRIDGE";
};

// True when this process runs inside an xrdp session (chansrv's API socket exists for
// our DISPLAY).
bool in_xrdp_session();

// A Connector that opens the channel (< 1 ms for a static channel, ~50 ms for a dynamic
// one) once an RDP client is attached to the session: while none is, it waits (polling a
// file, no channel traffic) instead of opening a channel nobody will answer.
Connector xrdp_connector(boost::asio::io_context& io, XrdpOptions options);

// For StreamDeskLink's health check: "" while an RDP client is attached to this xrdp session,
// else the reason to drop the channel. xrdp 0.9's chansrv listens on
// <sockdir>/xrdp_chansrv_socket_<display> only while no xrdp connection is attached (it stops
// listening, removing the file, when xrdp connects and listens again when xrdp goes away);
// it keeps the channel's socket open after the client left and drops what it is given, so
// an idle shim would otherwise never learn that the desk is gone. When the file's directory
// cannot be found (other xrdp layouts), the client counts as attached (no change).
std::string xrdp_client_gone();

}  // namespace cardbridge::shim
