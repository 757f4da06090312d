// The plugin registry: loading, refusing (ABI, non-plugins, duplicates), unknown names, lifetimes.
#include <gtest/gtest.h>

#include <fstream>

#include "paths.hpp"
#include "registry.hpp"

namespace fs = std::filesystem;
using namespace lminv;

namespace {

const fs::path kBuiltins = LMINV_BUILD_PLUGIN_DIR;
const fs::path kTestPlugins = LMINV_TEST_PLUGIN_DIR;

bool rejected_with(const Registry& r, const std::string& file_part, const std::string& reason_part) {
  for (const RejectedPlugin& p : r.rejected())
    if (p.file.string().find(file_part) != std::string::npos && p.reason.find(reason_part) != std::string::npos)
      return true;
  return false;
}

}  // namespace

TEST(Registry, LoadsTheBuiltInPluginsWithVersionsAndFiles) {
  Registry r({kBuiltins});
  for (auto [kind, name] : {std::pair{PluginKind::backend, "reference"}, std::pair{PluginKind::optimizer, "descent"},
                            std::pair{PluginKind::decoder, "pinv"}}) {
    const PluginInfo* info = r.find(kind, name);
    ASSERT_NE(info, nullptr) << name;
    EXPECT_FALSE(info->version.empty());
    EXPECT_TRUE(fs::exists(info->file));
    EXPECT_NE(info->file.filename().string().find("lminv-plugin-"), std::string::npos);
  }
  EXPECT_TRUE(r.rejected().empty());
}

TEST(Registry, RefusesAPluginOfAnotherAbiVersionNamingTheFile) {
  Registry r({kTestPlugins / "abi"});
  EXPECT_TRUE(r.plugins().empty());
  EXPECT_TRUE(rejected_with(r, "lminv-plugin-abi-mismatch", "ABI version " + std::to_string(kAbiVersion + 1)));
}

TEST(Registry, RefusesADescriptorOfAnotherSizeNamingBothSizes) {
  Registry r({kTestPlugins / "bad1"});
  EXPECT_TRUE(r.plugins().empty());
  EXPECT_TRUE(rejected_with(r, "lminv-plugin-bad-descriptor-1",
                            "descriptor is " + std::to_string(sizeof(PluginDescriptor) + 8) + " bytes, this lminv's is " +
                                std::to_string(sizeof(PluginDescriptor))));
}

TEST(Registry, RefusesAnotherStringAbiNamingTheDifference) {
  Registry r({kTestPlugins / "bad2"});
  EXPECT_TRUE(r.plugins().empty());
  ASSERT_EQ(r.rejected().size(), 1u);
  const std::string why = r.rejected()[0].reason;
  EXPECT_NE(why.find("cxx11-abi 0 in the plugin, 1 here"), std::string::npos) << why;
  EXPECT_NE(why.find("plugin compiler gcc-4"), std::string::npos) << why;
  EXPECT_EQ(why.find("stdlib "), std::string::npos) << why;  // the words that agree are not listed
}

TEST(Registry, BuildTagDifferenceIsEmptyForItsOwnTagAndNamesEachWordThatDiffers) {
  EXPECT_EQ(build_tag_difference(kBuildTag), "");
  const std::string d = build_tag_difference("stdlib=libc++ debug-containers=1 pointer-bytes=4");
  for (const char* part : {"stdlib libc++ in the plugin", "cxx11-abi (not given) in the plugin",
                           "debug-containers 1 in the plugin", "pointer-bytes 4 in the plugin"})
    EXPECT_NE(d.find(part), std::string::npos) << part << " in: " << d;
}

TEST(Registry, AThrowingEntryIsRefusedLikeAnyBrokenPluginAndTheOthersStillLoad) {
  Registry r({kBuiltins, kTestPlugins / "bad3"});
  EXPECT_TRUE(rejected_with(r, "lminv-plugin-bad-descriptor-3", "entry threw: the plugin's configuration file is missing"));
  EXPECT_NE(r.find(PluginKind::optimizer, "descent"), nullptr);
}

TEST(Registry, ALoadFailureGivesTheLoadersOwnMessage) {
  Registry r({kTestPlugins / "missingdep"});
  EXPECT_TRUE(r.plugins().empty());
  // The loader names the library it could not find; Boost.DLL alone would say "Bad file descriptor".
  EXPECT_TRUE(rejected_with(r, "lminv-plugin-missing-dep", "liblminv-test-dependency.so")) << [&] {
    std::string all;
    for (const RejectedPlugin& p : r.rejected()) all += p.file.string() + ": " + p.reason + "\n";
    return all;
  }();
}

TEST(Registry, RefusesALibraryWithoutTheEntry) {
  Registry r({kTestPlugins / "noentry"});
  EXPECT_TRUE(r.plugins().empty());
  EXPECT_TRUE(rejected_with(r, "lminv-plugin-no-entry", "exports no 'lminv_plugin' entry"));
}

TEST(Registry, RefusesAFileThatIsNoSharedLibrary) {
  const fs::path dir = fs::temp_directory_path() / ("lminv-registry-" + std::to_string(::getpid()));
  fs::create_directories(dir);
  std::ofstream(dir / "lminv-plugin-garbage.so") << "this is not an ELF file\n";
  Registry r({dir});
  EXPECT_TRUE(r.plugins().empty());
  EXPECT_TRUE(rejected_with(r, "lminv-plugin-garbage.so", "cannot be loaded"));
  fs::remove_all(dir);
}

TEST(Registry, RefusesTheSecondPluginOfOneKindAndName) {
  Registry r({kBuiltins, kTestPlugins / "dup"});
  const PluginInfo* descent = r.find(PluginKind::optimizer, "descent");
  ASSERT_NE(descent, nullptr);
  EXPECT_EQ(descent->file.parent_path(), fs::canonical(kBuiltins));  // the first in search order wins
  EXPECT_TRUE(rejected_with(r, "lminv-plugin-descent-twin", "already loaded from"));
}

TEST(Registry, UnknownNameListsThoseAvailableOfThatKind) {
  Registry r({kBuiltins});
  try {
    r.create_optimizer("no-such-method");
    FAIL() << "no error";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("no optimizer plugin named 'no-such-method'"), std::string::npos) << msg;
    EXPECT_NE(msg.find("available: "), std::string::npos) << msg;
    EXPECT_NE(msg.find("descent"), std::string::npos) << msg;  // one of those available
  }
}

TEST(Registry, ObjectsWorkAfterTheRegistryIsGone) {
  std::shared_ptr<Backend> backend;
  {
    Registry r({kTestPlugins / "good"});
    backend = r.create_backend("echo");
  }
  EXPECT_EQ(backend->info().dtypes.size(), 2u);
  ModelSpec spec;
  spec.seq_len = 2;
  spec.n_embd = 3;
  auto model = keep_alive(backend->create_model(spec, nullptr), backend);
  backend.reset();  // the model alone keeps the plugin's objects alive
  Tensor x = Tensor::from<double>({1, 2, 3}, {1, 2, 3, 4, 5, 6});
  EXPECT_EQ(model->forward(x).get(5), 6.0);
}

TEST(Registry, IgnoresMissingFoldersAndScansEachFolderOnce) {
  Registry r({kBuiltins, "/no/such/folder", kBuiltins});
  EXPECT_EQ(r.search_dirs().size(), 1u);
  EXPECT_TRUE(r.rejected().empty());  // scanning a folder twice must not make duplicates
}

TEST(Registry, SearchOrderIsPluginDirsThenEnvironmentThenExecutableFolders) {
  ::setenv("LMINV_PLUGIN_PATH", "/env/one::/env/two", 1);
  const std::vector<fs::path> dirs = plugin_search_dirs({"/cli/dir"});
  ::unsetenv("LMINV_PLUGIN_PATH");
  ASSERT_EQ(dirs.size(), 5u);
  EXPECT_EQ(dirs[0], "/cli/dir");
  EXPECT_EQ(dirs[1], "/env/one");
  EXPECT_EQ(dirs[2], "/env/two");
  EXPECT_EQ(dirs[3], executable_dir());
  EXPECT_EQ(dirs[4], executable_dir().parent_path() / LMINV_PLUGIN_SUBDIR);
}
