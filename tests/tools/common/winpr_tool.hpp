// What the FreeRDP test tools (cb-rdp-client, cb-rdp-host) share: WinPR's log on stderr,
// and SIGTERM/SIGINT turned into a WinPR event their main loops wait on.
#pragma once

#include <pthread.h>
#include <signal.h>

#include <cstdlib>
#include <functional>
#include <thread>
#include <utility>

#include <spdlog/spdlog.h>
#include <winpr/synch.h>
#include <winpr/wlog.h>

namespace cardbridge::testtools {

// FreeRDP's own log (WLog) to stderr: info at --log-level debug or finer, else warn;
// WLOG_LEVEL in the environment still wins.
inline void route_wlog_to_stderr(spdlog::level::level_enum level) {
  wLog* root = WLog_GetRoot();
  WLog_SetLogAppenderType(root, WLOG_APPENDER_CONSOLE);
  wLogAppender* appender = WLog_GetLogAppender(root);
  if (appender) WLog_ConfigureAppender(appender, "outputstream", const_cast<char*>("stderr"));
  if (!std::getenv("WLOG_LEVEL")) WLog_SetLogLevel(root, level <= spdlog::level::debug ? WLOG_INFO : WLOG_WARN);
}

// Blocks SIGTERM and SIGINT (and ignores SIGPIPE) in the calling thread, which threads
// started later inherit, and lets one thread take them: each sets event(). Construct it
// before starting any other thread. |on_signal| is told which signal came.
class StopOnSignal {
 public:
  explicit StopOnSignal(std::function<void(int)> on_signal) {
    sigemptyset(&sigs_);
    sigaddset(&sigs_, SIGTERM);
    sigaddset(&sigs_, SIGINT);
    sigaddset(&sigs_, SIGUSR1);  // internal: wakes the signal thread at exit
    pthread_sigmask(SIG_BLOCK, &sigs_, nullptr);
    ::signal(SIGPIPE, SIG_IGN);
    event_ = CreateEventA(nullptr, TRUE, FALSE, nullptr);
    thread_ = std::thread([this, on_signal = std::move(on_signal)] {
      int sig = 0;
      sigwait(&sigs_, &sig);
      if (sig != SIGUSR1) on_signal(sig);
      SetEvent(event_);
    });
  }
  ~StopOnSignal() {
    pthread_kill(thread_.native_handle(), SIGUSR1);
    thread_.join();
    CloseHandle(event_);
  }
  StopOnSignal(const StopOnSignal&) = delete;
  StopOnSignal& operator=(const StopOnSignal&) = delete;

  HANDLE event() const { return event_; }

 private:
  sigset_t sigs_{};
  HANDLE event_ = nullptr;
  std::thread thread_;
};

}  // namespace cardbridge::testtools
