// libcardbridge-client.so: the FreeRDP client add-in, for FreeRDP 2 or 3 (one build each:
// CARDBRIDGE_FREERDP_MAJOR; the entry points and channel events are the same in both, settings
// are read through freerdp_settings_get_*, which both provide and FreeRDP 3 requires).
//   /vc:cardbridge[,opt...]   static virtual channel "CBRIDGE" (VirtualChannelEntryEx)
//   /dvc:cardbridge[,opt...]  dynamic virtual channel "CBRIDGE" (DVCPluginEntry)
// Options: log-level:LEVEL, readers:A+B (substring filter), deny-readers:A+B,
// allow-control:pinpad+escape+all+none+LIST (default pinpad), allow-set-attrib:none|all|LIST
// (default none), unsafe-log-card-data, name:DESKNAME, image:on|off (the card image, on by
// default); they narrow the admin's policy in /etc/cardbridge/desk.conf. Logs go through
// FreeRDP's WLog (com.cardbridge.*).
// Everything here is extern "C" glue: no exception crosses into FreeRDP.
#include <freerdp/addin.h>
#include <freerdp/dvc.h>
#include <freerdp/freerdp.h>
#include <freerdp/settings.h>
#include <freerdp/svc.h>
#include <winpr/stream.h>
#include <winpr/wtsapi.h>

#include <unistd.h>

#include <atomic>
#include <cstring>
#include <mutex>
#include <thread>

#include "cardbridge/support/log.hpp"
#include "channel_session.hpp"

namespace {

using cardbridge::client::AddinOptions;
using cardbridge::client::ChannelSession;

constexpr char kChannelName[] = "CBRIDGE";

cardbridge::log::Channel logger{"cardbridge.addin"};

std::string local_host_name() {
  char buf[256] = {};
  if (::gethostname(buf, sizeof buf - 1) != 0) return "desk";
  return buf;
}

// The client host name FreeRDP sends to the server (/client-hostname:), if any.
std::string client_hostname(const rdpSettings* settings) {
  if (!settings) return {};
  const char* name = freerdp_settings_get_string(settings, FreeRDP_ClientHostname);
  return name ? std::string(name) : std::string();
}

AddinOptions options_from(const ADDIN_ARGV* args) {
  std::string error;
  AddinOptions o = args ? AddinOptions::parse(args->argc, args->argv, &error) : AddinOptions{};
  cardbridge::client::init_addin_logging(o.log_level);
  if (!error.empty()) logger->warn("add-in options: {}", error);
  return o;
}

// Tears a session down; never waits for a card (its runtime goes to the Janitor).
void dispose(std::unique_ptr<ChannelSession> s) { s.reset(); }

// ---------------------------------------------------------------------------------------
// Static channel

struct StaticPlugin {
  CHANNEL_DEF def{};
  CHANNEL_ENTRY_POINTS_FREERDP_EX ep{};
  void* init_handle = nullptr;
  AddinOptions options;
  std::string default_name;
  std::mutex mu;  // guards open/open_handle against writes from engine threads
  bool open = false;
  DWORD open_handle = 0;
  std::unique_ptr<ChannelSession> session;
};

bool static_write(StaticPlugin* p, std::vector<uint8_t> frame) {
  std::lock_guard lock(p->mu);
  if (!p->open) return false;
  // FreeRDP keeps the buffer until WRITE_COMPLETE or WRITE_CANCELLED, where we free it.
  auto* buf = new uint8_t[frame.size()];
  std::memcpy(buf, frame.data(), frame.size());
  UINT rc = p->ep.pVirtualChannelWriteEx(p->init_handle, p->open_handle, buf, static_cast<ULONG>(frame.size()), buf);
  if (rc != CHANNEL_RC_OK) {
    delete[] buf;
    return false;
  }
  return true;
}

VOID VCAPITYPE static_open_event(LPVOID user, DWORD /*open_handle*/, UINT event, LPVOID data, UINT32 length,
                                 UINT32 /*total*/, UINT32 /*flags*/) {
  try {
    auto* p = static_cast<StaticPlugin*>(user);
    switch (event) {
      case CHANNEL_EVENT_DATA_RECEIVED:
        // Chunks (1600 bytes) go straight into the frame decoder: our framing does not
        // care where FreeRDP cut the message.
        if (p->session && data && length) p->session->feed(static_cast<const uint8_t*>(data), length);
        break;
      case CHANNEL_EVENT_WRITE_COMPLETE:
      case CHANNEL_EVENT_WRITE_CANCELLED:
        delete[] static_cast<uint8_t*>(data);
        break;
      default:
        break;
    }
  } catch (const std::exception& e) {
    logger->error("static channel event {}: {}", event, e.what());
  } catch (...) {
  }
}

VOID VCAPITYPE static_init_event(LPVOID user, LPVOID init_handle, UINT event, LPVOID /*data*/, UINT /*len*/) {
  auto* p = static_cast<StaticPlugin*>(user);
  try {
    switch (event) {
      case CHANNEL_EVENT_CONNECTED: {
        DWORD h = 0;
        UINT rc = p->ep.pVirtualChannelOpenEx(init_handle, &h, p->def.name, static_open_event);
        if (rc != CHANNEL_RC_OK) {
          logger->error("cannot open the {} channel (rc {})", kChannelName, rc);
          return;
        }
        {
          std::lock_guard lock(p->mu);
          p->open = true;
          p->open_handle = h;
        }
        if (!p->session) {
          p->session = std::make_unique<ChannelSession>(
              p->options, p->default_name, [p](std::vector<uint8_t> f) { return static_write(p, std::move(f)); },
              "rdp static channel CBRIDGE");
        }
        logger->info("static channel {} open", kChannelName);
        p->session->opened();
        break;
      }
      case CHANNEL_EVENT_DISCONNECTED: {
        DWORD h = 0;
        bool was_open = false;
        {
          std::lock_guard lock(p->mu);
          was_open = p->open;
          h = p->open_handle;
          p->open = false;
        }
        if (p->session) p->session->closed();
        if (was_open) p->ep.pVirtualChannelCloseEx(init_handle, h);
        logger->info("static channel {} closed", kChannelName);
        break;
      }
      case CHANNEL_EVENT_TERMINATED: {
        {
          std::lock_guard lock(p->mu);
          p->open = false;
        }
        if (p->session) p->session->shutdown();
        p->session.reset();
        delete p;
        break;
      }
      default:
        break;
    }
  } catch (const std::exception& e) {
    logger->error("static channel init event {}: {}", event, e.what());
  } catch (...) {
  }
}

// ---------------------------------------------------------------------------------------
// Dynamic channel

struct DvcPlugin;

struct DvcChannel {
  IWTSVirtualChannelCallback cb{};  // first member: FreeRDP hands this pointer back
  DvcPlugin* plugin = nullptr;
  std::mutex mu;
  IWTSVirtualChannel* channel = nullptr;
  std::unique_ptr<ChannelSession> session;
};

struct DvcPlugin {
  IWTSPlugin iface{};                   // first member
  IWTSListenerCallback listener_cb{};
  IWTSListener* listener = nullptr;
  AddinOptions options;
  std::string default_name;
};

DvcPlugin* plugin_of_listener(IWTSListenerCallback* cb) {
  return reinterpret_cast<DvcPlugin*>(reinterpret_cast<char*>(cb) - offsetof(DvcPlugin, listener_cb));
}

UINT dvc_on_data(IWTSVirtualChannelCallback* cb, wStream* s) {
  try {
    auto* c = reinterpret_cast<DvcChannel*>(cb);
    // Stream_Pointer is BYTE* in FreeRDP 2 and void* in FreeRDP 3.
    const auto* data = static_cast<const uint8_t*>(static_cast<const void*>(Stream_Pointer(s)));
    if (c->session) c->session->feed(data, Stream_GetRemainingLength(s));
    return CHANNEL_RC_OK;
  } catch (...) {
    return ERROR_INTERNAL_ERROR;
  }
}

UINT dvc_on_open(IWTSVirtualChannelCallback* cb) {
  try {
    auto* c = reinterpret_cast<DvcChannel*>(cb);
    logger->info("dynamic channel {} open", kChannelName);
    if (c->session) c->session->opened();
    return CHANNEL_RC_OK;
  } catch (...) {
    return ERROR_INTERNAL_ERROR;
  }
}

UINT dvc_on_close(IWTSVirtualChannelCallback* cb) {
  try {
    auto* c = reinterpret_cast<DvcChannel*>(cb);
    {
      std::lock_guard lock(c->mu);
      c->channel = nullptr;
    }
    logger->info("dynamic channel {} closed", kChannelName);
    if (c->session) c->session->closed();
    dispose(std::move(c->session));
    delete c;
    return CHANNEL_RC_OK;
  } catch (...) {
    return ERROR_INTERNAL_ERROR;
  }
}

UINT dvc_on_new_channel(IWTSListenerCallback* lcb, IWTSVirtualChannel* channel, BYTE* /*data*/, BOOL* accept,
                        IWTSVirtualChannelCallback** out) {
  try {
    DvcPlugin* p = plugin_of_listener(lcb);
    auto* c = new DvcChannel();
    c->cb.OnDataReceived = dvc_on_data;
    c->cb.OnOpen = dvc_on_open;
    c->cb.OnClose = dvc_on_close;
    c->plugin = p;
    c->channel = channel;
    c->session = std::make_unique<ChannelSession>(p->options, p->default_name, [c](std::vector<uint8_t> f) {
      std::lock_guard lock(c->mu);
      if (!c->channel) return false;
      // Write copies the buffer before returning.
      return c->channel->Write(c->channel, static_cast<ULONG>(f.size()), f.data(), nullptr) == CHANNEL_RC_OK;
    }, "rdp dynamic channel CBRIDGE");
    *accept = TRUE;
    *out = &c->cb;
    return CHANNEL_RC_OK;
  } catch (const std::exception& e) {
    logger->error("new dynamic channel: {}", e.what());
    *accept = FALSE;
    return ERROR_INTERNAL_ERROR;
  } catch (...) {
    *accept = FALSE;
    return ERROR_INTERNAL_ERROR;
  }
}

UINT dvc_initialize(IWTSPlugin* plugin, IWTSVirtualChannelManager* mgr) {
  try {
    auto* p = reinterpret_cast<DvcPlugin*>(plugin);
    p->listener_cb.OnNewChannelConnection = dvc_on_new_channel;
    return mgr->CreateListener(mgr, kChannelName, 0, &p->listener_cb, &p->listener);
  } catch (...) {
    return ERROR_INTERNAL_ERROR;
  }
}

UINT dvc_terminated(IWTSPlugin* plugin) {
  try {
    delete reinterpret_cast<DvcPlugin*>(plugin);
    return CHANNEL_RC_OK;
  } catch (...) {
    return ERROR_INTERNAL_ERROR;
  }
}

}  // namespace

extern "C" {

__attribute__((visibility("default"))) BOOL VCAPITYPE VirtualChannelEntryEx(PCHANNEL_ENTRY_POINTS_EX entry_points,
                                                                          PVOID init_handle) {
  try {
    auto* ep = reinterpret_cast<CHANNEL_ENTRY_POINTS_FREERDP_EX*>(entry_points);
    if (!ep || ep->cbSize < sizeof(CHANNEL_ENTRY_POINTS_FREERDP_EX) || ep->MagicNumber != FREERDP_CHANNEL_MAGIC_NUMBER)
      return FALSE;
    auto* p = new StaticPlugin();
    p->ep = *ep;
    p->init_handle = init_handle;
    p->options = options_from(static_cast<ADDIN_ARGV*>(ep->pExtendedData));
    p->default_name = local_host_name();
    if (auto name = client_hostname(ep->context ? ep->context->settings : nullptr); !name.empty()) {
      p->default_name = name;
    }
    static_assert(sizeof kChannelName <= sizeof p->def.name);
    std::memcpy(p->def.name, kChannelName, sizeof kChannelName);
    p->def.options = CHANNEL_OPTION_INITIALIZED | CHANNEL_OPTION_ENCRYPT_RDP | CHANNEL_OPTION_COMPRESS_RDP;
    UINT rc = ep->pVirtualChannelInitEx(p, nullptr, init_handle, &p->def, 1, VIRTUAL_CHANNEL_VERSION_WIN2000,
                                        static_init_event);
    if (rc != CHANNEL_RC_OK) {
      logger->error("VirtualChannelInitEx failed (rc {})", rc);
      delete p;
      return FALSE;
    }
    logger->info("cardbridge static channel add-in loaded (desk '{}')", p->options.name.empty() ? p->default_name : p->options.name);
    return TRUE;
  } catch (...) {
    return FALSE;
  }
}

__attribute__((visibility("default"))) UINT DVCPluginEntry(IDRDYNVC_ENTRY_POINTS* entry_points) {
  try {
    if (!entry_points) return ERROR_INVALID_PARAMETER;
    if (entry_points->GetPlugin(entry_points, "cardbridge")) return CHANNEL_RC_OK;  // already loaded
    auto* p = new DvcPlugin();
    p->iface.Initialize = dvc_initialize;
    p->iface.Terminated = dvc_terminated;
    p->options = options_from(entry_points->GetPluginData(entry_points));
    p->default_name = local_host_name();
    if (auto name = client_hostname(static_cast<const rdpSettings*>(entry_points->GetRdpSettings(entry_points)));
        !name.empty()) {
      p->default_name = name;
    }
    UINT rc = entry_points->RegisterPlugin(entry_points, "cardbridge", &p->iface);
    if (rc != CHANNEL_RC_OK) {
      delete p;
      return rc;
    }
    logger->info("cardbridge dynamic channel add-in loaded");
    return CHANNEL_RC_OK;
  } catch (...) {
    return ERROR_INTERNAL_ERROR;
  }
}

}  // extern "C"
