# Cross-compiling for 64-bit Windows with Debian's mingw-w64 (g++-mingw-w64-x86-64-posix).
#
# The "posix" flavour of the compiler is required: it gives std::thread, std::mutex and
# std::condition_variable (winpthreads), which spdlog and the cores' tests use. The
# "win32" flavour has no <mutex>/<thread> in GCC 12.
#
# Used by scripts/windows-build for CardBridge and for the third-party libraries it
# cross-builds (protobuf-lite, GoogleTest), so that all of them share one ABI.
set(CMAKE_SYSTEM_NAME Windows)
set(CMAKE_SYSTEM_PROCESSOR x86_64)

set(CARDBRIDGE_MINGW_TRIPLE x86_64-w64-mingw32)
set(CMAKE_C_COMPILER   ${CARDBRIDGE_MINGW_TRIPLE}-gcc-posix)
set(CMAKE_CXX_COMPILER ${CARDBRIDGE_MINGW_TRIPLE}-g++-posix)
set(CMAKE_RC_COMPILER  ${CARDBRIDGE_MINGW_TRIPLE}-windres)

# Look for libraries and headers only in the mingw sysroot and in the prefixes given on the
# command line (CMAKE_PREFIX_PATH / CMAKE_FIND_ROOT_PATH); programs (protoc) on the build host.
# CARDBRIDGE_MINGW_PREFIX: where scripts/windows-build installed the cross-built
# third-party libraries (protobuf-lite, GoogleTest, fmt and spdlog headers).
list(APPEND CMAKE_TRY_COMPILE_PLATFORM_VARIABLES CARDBRIDGE_MINGW_PREFIX)
list(APPEND CMAKE_FIND_ROOT_PATH /usr/${CARDBRIDGE_MINGW_TRIPLE} ${CARDBRIDGE_MINGW_PREFIX})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)

# Self-contained executables: the test programs run under wine64 without the mingw runtime
# DLLs (libstdc++-6, libgcc_s_seh-1, libwinpthread-1) on the Wine path.
set(CMAKE_EXE_LINKER_FLAGS_INIT "-static -static-libgcc -static-libstdc++")

# Run cross-built programs (gtest_discover_tests, try_run) through Wine when it is there.
find_program(CARDBRIDGE_WINE64 NAMES wine64 PATHS /usr/lib/wine NO_CMAKE_FIND_ROOT_PATH)
if(CARDBRIDGE_WINE64)
  set(CMAKE_CROSSCOMPILING_EMULATOR ${CARDBRIDGE_WINE64})
endif()
