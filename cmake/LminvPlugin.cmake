# lminv_add_plugin(TARGET SOURCES ...): a plugin module named lminv-plugin-<TARGET>.so, built with hidden
# visibility against the SDK, so the host's registry finds it. Used in-tree and, through
# find_package(lminv), by plugins built elsewhere.
function(lminv_add_plugin target)
  cmake_parse_arguments(ARG "" "" "SOURCES" ${ARGN})
  add_library(${target} MODULE ${ARG_SOURCES})
  target_link_libraries(${target} PRIVATE lminv::sdk)
  set_target_properties(${target} PROPERTIES
    PREFIX ""
    OUTPUT_NAME "lminv-plugin-${target}"
    CXX_VISIBILITY_PRESET hidden
    VISIBILITY_INLINES_HIDDEN ON)
endfunction()
