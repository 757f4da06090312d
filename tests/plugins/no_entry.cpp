// A shared library named like a plugin that exports no lminv_plugin entry.
extern "C" __attribute__((visibility("default"))) int lminv_not_the_entry() { return 42; }
