extern "C" int lminv_test_dependency_value() { return 42; }
