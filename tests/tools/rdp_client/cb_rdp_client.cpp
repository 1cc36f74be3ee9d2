// cb-rdp-client: a headless FreeRDP 2 or 3 client (software GDI, no X) that loads the CardBridge
// add-in from a build directory, for end-to-end tests over a real RDP channel.
//
//   cb-rdp-client --host 127.0.0.1 --port P --addin PATH/libcardbridge-client.so
//                 --mode static|dynamic [--addin-args "log-level:debug,name:desk-a"]
//                 [--client-name NAME] [--log-level LEVEL]
//
// FreeRDP only dlopens add-ins from its own directory, so the add-in is handed over through
// freerdp_register_addin_provider(): the provider answers "cardbridge" with the add-in's entry
// point (VirtualChannelEntryEx for /vc, DVCPluginEntry for /dvc) and hands every other name to
// freerdp_channels_load_static_addin_entry, so the built-in drdynvc is still found.
//
// TLS only, certificate ignored, no NLA; network auto-detect, heartbeat, multitransport,
// clipboard, audio and device redirection are off, so only CBRIDGE (and drdynvc in dynamic
// mode) is used. Prints "CONNECTED" on stdout once connected; runs until SIGTERM/SIGINT or until
// the server ends the session. Exit status: 0 after SIGTERM/SIGINT or an orderly disconnect by
// the server, 1 when the connection cannot be made, 2 for bad arguments or set-up failures,
// 3 when the connection is lost without an orderly disconnect. Logs go to stderr.
#include <dlfcn.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <freerdp/addin.h>
#include <freerdp/client/channels.h>
#include <freerdp/client/cmdline.h>
#include <freerdp/dvc.h>
#include <freerdp/error.h>
#include <freerdp/freerdp.h>
#include <freerdp/gdi/gdi.h>
#include <freerdp/settings.h>
#include <winpr/synch.h>
#include <winpr/wlog.h>

#include "common/winpr_tool.hpp"

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>

#include "cardbridge/support/log.hpp"

namespace {

namespace cb = cardbridge;

cb::log::Channel logger{"cb-rdp-client"};

constexpr char kAddinName[] = "cardbridge";

struct Addin {
  void* lib = nullptr;
  PVIRTUALCHANNELENTRY static_entry = nullptr;  // VirtualChannelEntryEx, typed as FreeRDP passes it
  PVIRTUALCHANNELENTRY dynamic_entry = nullptr;  // DVCPluginEntry, likewise
};
Addin g_addin;

bool g_dynamic = false;
std::vector<std::string> g_addin_args;

PVIRTUALCHANNELENTRY addin_provider(LPCSTR name, LPCSTR subsystem, LPCSTR type, DWORD flags) {
  if (name && std::strcmp(name, kAddinName) == 0 && !subsystem) {
    if (flags & FREERDP_ADDIN_CHANNEL_DYNAMIC) return g_addin.dynamic_entry;
    if ((flags & FREERDP_ADDIN_CHANNEL_STATIC) && (flags & FREERDP_ADDIN_CHANNEL_ENTRYEX)) return g_addin.static_entry;
    return nullptr;  // no plain VirtualChannelEntry: FreeRDP asks for the Ex one first
  }
  return freerdp_channels_load_static_addin_entry(name, subsystem, type, flags);
}

bool load_addin(const std::string& path, std::string* error) {
  g_addin.lib = ::dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!g_addin.lib) {
    *error = ::dlerror();
    return false;
  }
  // dlsym returns an object pointer; FreeRDP's loader hands entry points around as
  // PVIRTUALCHANNELENTRY whatever their real type, and so do we.
  void* ex = ::dlsym(g_addin.lib, "VirtualChannelEntryEx");
  void* dvc = ::dlsym(g_addin.lib, "DVCPluginEntry");
  std::memcpy(&g_addin.static_entry, &ex, sizeof ex);
  std::memcpy(&g_addin.dynamic_entry, &dvc, sizeof dvc);
  if (g_dynamic ? !dvc : !ex) {
    *error = fmt::format("{} does not export {}", path, g_dynamic ? "DVCPluginEntry" : "VirtualChannelEntryEx");
    return false;
  }
  return true;
}

BOOL on_pre_connect(freerdp* instance) {
  rdpSettings* s = instance->context->settings;
  std::vector<char*> argv;
  argv.push_back(const_cast<char*>(kAddinName));
  for (auto& a : g_addin_args) argv.push_back(a.data());
  const BOOL added = g_dynamic ? freerdp_client_add_dynamic_channel(s, argv.size(), argv.data())
                               : freerdp_client_add_static_channel(s, argv.size(), argv.data());
  if (!added) {
    logger->error("cannot add the {} channel", g_dynamic ? "dynamic" : "static");
    return FALSE;
  }
#if CARDBRIDGE_FREERDP_MAJOR >= 3
  return TRUE;  // FreeRDP 3 recreates the channels after PreConnect and loads them in LoadChannels
}

BOOL on_load_channels(freerdp* instance) {
  if (!freerdp_client_load_addins(instance->context->channels, instance->context->settings)) {
    logger->error("freerdp_client_load_addins failed");
    return FALSE;
  }
  return TRUE;
}
#else
  if (!freerdp_client_load_addins(instance->context->channels, s)) {
    logger->error("freerdp_client_load_addins failed");
    return FALSE;
  }
  return TRUE;
}
#endif

BOOL on_post_connect(freerdp* instance) {
  if (!gdi_init(instance, PIXEL_FORMAT_XRGB32)) {
    logger->error("gdi_init failed");
    return FALSE;
  }
  return TRUE;
}

void on_post_disconnect(freerdp* instance) { gdi_free(instance); }

#if CARDBRIDGE_FREERDP_MAJOR >= 3
BOOL on_authenticate(freerdp*, char**, char**, char**, rdp_auth_reason) { return TRUE; }
#else
BOOL on_authenticate(freerdp*, char**, char**, char**) { return TRUE; }
#endif

DWORD on_verify_certificate(freerdp*, const char*, UINT16, const char*, const char*, const char*, const char*,
                            DWORD) {
  return 2;  // accept for this session (IgnoreCertificate normally keeps this from being asked)
}

std::vector<std::string> split(const std::string& text, char sep) {
  std::vector<std::string> out;
  std::string cur;
  for (char c : text) {
    if (c == sep) {
      if (!cur.empty()) out.push_back(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  if (!cur.empty()) out.push_back(cur);
  return out;
}

bool shall_disconnect(freerdp* instance) {
#if CARDBRIDGE_FREERDP_MAJOR >= 3
  return freerdp_shall_disconnect_context(instance->context);
#else
  return freerdp_shall_disconnect(instance);
#endif
}

bool orderly_end(UINT32 error_info) {
  switch (error_info) {
    case ERRINFO_RPC_INITIATED_DISCONNECT:
    case ERRINFO_RPC_INITIATED_LOGOFF:
    case ERRINFO_DISCONNECTED_BY_OTHER_CONNECTION:
    case ERRINFO_RPC_INITIATED_DISCONNECT_BY_USER:
    case ERRINFO_LOGOFF_BY_USER:
      return true;
    default:
      return false;
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"cb-rdp-client: headless FreeRDP client with the CardBridge add-in"};
  std::string host = "127.0.0.1";
  int port = 3389;
  std::string addin_path;
  std::string mode;
  std::string addin_args;
  std::string client_name;
  std::string level = "info";
  app.add_option("--host", host)->capture_default_str();
  app.add_option("--port", port)->capture_default_str();
  app.add_option("--addin", addin_path, "path to libcardbridge-client.so")->required()->check(CLI::ExistingFile);
  app.add_option("--mode", mode, "static (/vc) or dynamic (/dvc) channel")
      ->required()
      ->check(CLI::IsMember({"static", "dynamic"}));
  app.add_option("--addin-args", addin_args, "add-in options, comma-separated (log-level:debug,name:desk-a)");
  app.add_option("--client-name", client_name, "client host name sent to the server (15 characters at most)");
  app.add_option("--log-level", level, "trace, debug, info, warn, error (this program and FreeRDP)")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  g_dynamic = mode == "dynamic";
  g_addin_args = split(addin_args, ',');
  auto lvl = cb::log::parse_level(level);
  if (!lvl) {
    std::fprintf(stderr, "cb-rdp-client: unknown log level '%s'\n", level.c_str());
    return 2;
  }
  cb::log::init(*lvl, "cb-rdp-client");
  cardbridge::testtools::route_wlog_to_stderr(*lvl);

  // freerdp_context_new() fails without a HOME (FreeRDP keeps its known-hosts file there).
  std::string private_home;
  if (const char* h = std::getenv("HOME"); !h || !*h) {
    char tmpl[] = "/tmp/cb-rdp-client-home-XXXXXX";
    if (!::mkdtemp(tmpl)) {
      logger->critical("HOME is unset and no private one can be made");
      return 2;
    }
    private_home = tmpl;
    ::setenv("HOME", tmpl, 1);
  }

  cardbridge::testtools::StopOnSignal signals([](int sig) { logger->info("signal {}: disconnecting", sig); });
  HANDLE stop = signals.event();

  int rc = 0;
  freerdp* instance = nullptr;
  std::string error;
  if (!load_addin(addin_path, &error)) {
    logger->critical("cannot load the add-in: {}", error);
    rc = 2;
  } else {
    freerdp_register_addin_provider(addin_provider, 0);
    instance = freerdp_new();
    if (!instance) {
      rc = 2;
    } else {
      instance->PreConnect = on_pre_connect;
      instance->PostConnect = on_post_connect;
      instance->PostDisconnect = on_post_disconnect;
#if CARDBRIDGE_FREERDP_MAJOR >= 3
      instance->LoadChannels = on_load_channels;
      instance->AuthenticateEx = on_authenticate;
#else
      instance->Authenticate = on_authenticate;
#endif
      instance->VerifyCertificateEx = on_verify_certificate;
      if (!freerdp_context_new(instance)) {
        logger->critical("freerdp_context_new failed");
        freerdp_free(instance);
        instance = nullptr;
        rc = 2;
      }
    }
  }

  if (rc == 0) {
    rdpSettings* s = instance->context->settings;
    freerdp_settings_set_string(s, FreeRDP_ServerHostname, host.c_str());
    freerdp_settings_set_uint32(s, FreeRDP_ServerPort, static_cast<UINT32>(port));
    freerdp_settings_set_bool(s, FreeRDP_IgnoreCertificate, TRUE);
    freerdp_settings_set_bool(s, FreeRDP_RdpSecurity, FALSE);
    freerdp_settings_set_bool(s, FreeRDP_TlsSecurity, TRUE);
    freerdp_settings_set_bool(s, FreeRDP_NlaSecurity, FALSE);
    freerdp_settings_set_bool(s, FreeRDP_ExtSecurity, FALSE);
#if CARDBRIDGE_FREERDP_MAJOR < 3
    // FreeRDP 3's server uses the message channel whatever the client asked for, and its client
    // then fails the connection when it has switched these off: keep FreeRDP 3's defaults.
    freerdp_settings_set_bool(s, FreeRDP_NetworkAutoDetect, FALSE);
    freerdp_settings_set_bool(s, FreeRDP_SupportHeartbeatPdu, FALSE);
    freerdp_settings_set_bool(s, FreeRDP_SupportMultitransport, FALSE);
#endif
    freerdp_settings_set_bool(s, FreeRDP_RedirectClipboard, FALSE);
    freerdp_settings_set_bool(s, FreeRDP_AudioPlayback, FALSE);
    freerdp_settings_set_bool(s, FreeRDP_AudioCapture, FALSE);
    freerdp_settings_set_bool(s, FreeRDP_DeviceRedirection, FALSE);
    freerdp_settings_set_bool(s, FreeRDP_SupportGraphicsPipeline, FALSE);
    freerdp_settings_set_bool(s, FreeRDP_SupportDisplayControl, FALSE);
    freerdp_settings_set_bool(s, FreeRDP_RemoteFxCodec, FALSE);
    freerdp_settings_set_bool(s, FreeRDP_AutoReconnectionEnabled, FALSE);
    freerdp_settings_set_bool(s, FreeRDP_SoftwareGdi, TRUE);
    freerdp_settings_set_uint32(s, FreeRDP_ColorDepth, 32);
    freerdp_settings_set_string(s, FreeRDP_Username, "cardbridge");
    if (!client_name.empty()) freerdp_settings_set_string(s, FreeRDP_ClientHostname, client_name.c_str());

    if (!freerdp_connect(instance)) {
      logger->error("cannot connect to {}:{}: {}", host, port,
                      freerdp_get_last_error_string(freerdp_get_last_error(instance->context)));
      rc = 1;
    } else {
      logger->info("connected to {}:{} ({} channel)", host, port, mode);
      std::printf("CONNECTED\n");
      std::fflush(stdout);
      bool stopped = false;
      // Check before the first wait: freerdp_connect() may leave data in the TLS layer's
      // buffer (the drdynvc capabilities request, typically), which no handle signals; the
      // short timeout covers the same case later on, as in FreeRDP's own clients.
      while (!shall_disconnect(instance) && freerdp_check_event_handles(instance->context)) {
        HANDLE handles[65];
        DWORD count = freerdp_get_event_handles(instance->context, handles, 64);
        if (count == 0) {
          logger->error("freerdp_get_event_handles failed");
          break;
        }
        handles[count++] = stop;
        if (WaitForMultipleObjects(count, handles, FALSE, 100) == WAIT_FAILED) {
          logger->error("WaitForMultipleObjects failed");
          break;
        }
        if (WaitForSingleObject(stop, 0) == WAIT_OBJECT_0) {
          stopped = true;
          break;
        }
      }
      const UINT32 info = freerdp_error_info(instance);
      if (stopped) {
        rc = 0;
      } else if (orderly_end(info)) {
        logger->info("the server ended the session ({})", freerdp_get_error_info_string(info));
        rc = 0;
      } else {
        logger->error("connection lost: {} / {}", freerdp_get_error_info_string(info),
                        freerdp_get_last_error_string(freerdp_get_last_error(instance->context)));
        rc = 3;
      }
      freerdp_disconnect(instance);
    }
  }

  if (instance) {
    freerdp_context_free(instance);
    freerdp_free(instance);
  }
  // The add-in library stays loaded: its threads may still be winding down.
  if (!private_home.empty()) {
    std::error_code ec;
    std::filesystem::remove_all(private_home, ec);
  }
  return rc;
}
