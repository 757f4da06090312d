# LMINV_SANITIZE: build everything lminv builds (host, plugins, tests) with GCC's or Clang's sanitizers.
#   ""                   off (the default)
#   "address,undefined"  ASan + UBSan; UBSan findings stop the program (-fno-sanitize-recover=all)
#   "thread"             TSan
# scripts/sanitize.sh configures a build folder with one of them and runs the tests that suit it
# (docs/reliability.md, "Sanitizers", says which and why). The flags are directory-wide compile and link options, so this file
# is included before the host, plugins and tests are added. The executables link the sanitizer runtime (it must be
# the first library loaded); the plugins they dlopen are built and linked with the same flags and use that runtime.
set(LMINV_SANITIZE "" CACHE STRING "Sanitizers for every target: empty, address,undefined, or thread")
set_property(CACHE LMINV_SANITIZE PROPERTY STRINGS "" "address,undefined" "address" "undefined" "thread")

if(LMINV_SANITIZE)
  if(NOT CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    message(FATAL_ERROR "LMINV_SANITIZE=${LMINV_SANITIZE} needs GCC or Clang, not ${CMAKE_CXX_COMPILER_ID}")
  endif()
  string(REPLACE "," ";" lminv_sanitizers "${LMINV_SANITIZE}")
  foreach(s IN LISTS lminv_sanitizers)
    if(NOT s MATCHES "^(address|undefined|thread)$")
      message(FATAL_ERROR "LMINV_SANITIZE: unknown sanitizer '${s}' in '${LMINV_SANITIZE}' "
        "(use address,undefined or thread)")
    endif()
  endforeach()
  if("thread" IN_LIST lminv_sanitizers AND "address" IN_LIST lminv_sanitizers)
    message(FATAL_ERROR "LMINV_SANITIZE: thread and address cannot be combined (two builds: address,undefined; thread)")
  endif()

  set(lminv_sanitize_flags "-fsanitize=${LMINV_SANITIZE}" -fno-omit-frame-pointer)
  if("undefined" IN_LIST lminv_sanitizers)
    # A UB report is a failure, not a line in the log that a passing test hides.
    list(APPEND lminv_sanitize_flags -fno-sanitize-recover=all)
  endif()
  add_compile_options(${lminv_sanitize_flags})
  add_link_options(${lminv_sanitize_flags})
  list(JOIN lminv_sanitize_flags " " lminv_shown)
  message(STATUS "lminv: sanitizers ${LMINV_SANITIZE}: ${lminv_shown}")
endif()
