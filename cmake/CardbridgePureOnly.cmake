# CARDBRIDGE_PURE_ONLY=ON: the pure libraries (no sockets, threads of their own, clocks or
# platform headers) and their unit tests, nothing else. This is what the Windows
# cross-build (scripts/windows-build, cmake/toolchains/mingw-w64-x86_64.cmake) compiles
# and runs under Wine; see docs/windows-citrix.md.
#
# Convention: in each component's CMakeLists.txt the pure libraries come first, and
#   if(CARDBRIDGE_PURE_ONLY)
#     return()
#   endif()
# marks where the I/O edges (Asio, OpenSSL, libpcsclite, FreeRDP) begin.
find_package(Threads REQUIRED)
find_package(Protobuf REQUIRED)
find_package(spdlog REQUIRED)
find_package(fmt REQUIRED)

# cardbridge::support, cardbridge::protocol
add_subdirectory(protocol)
# cardbridge::shim_core (pcscd_wire, ReaderTable, ShimCore)
add_subdirectory(server-shim)
# cardbridge::client_core (DeskCore, policy, speculation)
add_subdirectory(client-plugin)

if(CARDBRIDGE_BUILD_TESTS)
  add_subdirectory(tests)
endif()
