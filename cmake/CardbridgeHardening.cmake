# Compiler and linker hardening for every target of the build (our libraries, programs,
# the FreeRDP add-in, the generated protobuf code, test tools and tests), on Linux with GCC
# or Clang:
#   -fstack-protector-strong        stack canaries in every function with a local array or
#                                   an address-taken local
#   -D_FORTIFY_SOURCE=2             checked libc calls (memcpy, snprintf, read...) where the
#                                   compiler knows the buffer size; needs optimisation, so not
#                                   in Debug builds, and not in sanitizer builds (ASan checks
#                                   the same accesses better and its interceptors expect the
#                                   plain functions)
#   -fstack-clash-protection        probes every page of a large stack frame (a frame cannot
#                                   jump over the guard page into another mapping)
#   -fcf-protection=full            Intel CET: IBT landing pads and shadow-stack compatibility
#                                   (x86 only)
#   PIE, -z relro -z now            position-independent executables; full RELRO (the GOT is
#                                   read-only once the dynamic linker has bound every symbol
#                                   at start-up: BIND_NOW)
#
# Debian packages (installers/debian/rules: DEB_BUILD_MAINT_OPTIONS=hardening=+all) also pass
# dpkg-buildflags (-fstack-protector-strong, -D_FORTIFY_SOURCE=2, -z relro -z now): the same
# flags, so they agree; a _FORTIFY_SOURCE already in CMAKE_<LANG>_FLAGS (dpkg's, or a
# packager's -D_FORTIFY_SOURCE=3) is left as it is rather than redefined. dpkg 1.21 (Debian
# 12) has no stack-clash or CET feature: those come from here.
#
# tests/hardening/check_hardening.py reads the built ELF files and fails when one lacks any
# of these (CTest: hardening_check).
option(CARDBRIDGE_HARDENING "Compiler and linker hardening (stack protector, FORTIFY, stack clash, CET, PIE, full RELRO)" ON)

if(NOT CARDBRIDGE_HARDENING OR WIN32 OR NOT CMAKE_SYSTEM_NAME STREQUAL "Linux")
  return()
endif()

include(CheckCXXCompilerFlag)
include(CheckPIESupported)

# PIE for executables (CMAKE_POSITION_INDEPENDENT_CODE is ON at the top level; CMP0083 makes
# CMake pass -pie at link time once check_pie_supported() has run).
check_pie_supported(OUTPUT_VARIABLE _cb_pie_output LANGUAGES C CXX)
if(NOT CMAKE_CXX_LINK_PIE_SUPPORTED)
  message(FATAL_ERROR "CardBridge: the toolchain cannot link position-independent executables:\n${_cb_pie_output}")
endif()

set(_cb_hardening_flags -fstack-protector-strong -fstack-clash-protection)
if(CMAKE_SYSTEM_PROCESSOR MATCHES "^(x86_64|AMD64|amd64|i.86)$")
  list(APPEND _cb_hardening_flags -fcf-protection=full)
endif()
foreach(_flag IN LISTS _cb_hardening_flags)
  string(MAKE_C_IDENTIFIER "CARDBRIDGE_HAS${_flag}" _var)
  check_cxx_compiler_flag(${_flag} ${_var})
  if(NOT ${_var})
    message(FATAL_ERROR "CardBridge hardening: ${CMAKE_CXX_COMPILER_ID} ${CMAKE_CXX_COMPILER_VERSION} lacks ${_flag} "
                        "(configure with -DCARDBRIDGE_HARDENING=OFF to build without it)")
  endif()
endforeach()
add_compile_options(${_cb_hardening_flags})

# FORTIFY: only where the code is optimised, and left to whoever already set it.
if(NOT CARDBRIDGE_SANITIZERS AND NOT "${CMAKE_C_FLAGS} ${CMAKE_CXX_FLAGS}" MATCHES "_FORTIFY_SOURCE")
  add_compile_definitions($<$<NOT:$<CONFIG:Debug>>:_FORTIFY_SOURCE=2>)
endif()

add_link_options(LINKER:-z,relro LINKER:-z,now)

message(STATUS "CardBridge hardening: ${_cb_hardening_flags}, _FORTIFY_SOURCE=2 (optimised, unsanitized builds), PIE, -z relro -z now")
