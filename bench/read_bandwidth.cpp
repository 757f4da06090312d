// The machine's read bandwidth for bench/RESULTS.md's floor estimate: 2 threads summing a touched 1 GiB array, best
// of 5. Build and run: g++ -O3 -march=native -pthread bench/read_bandwidth.cpp -o /tmp/bw && /tmp/bw
#include <chrono>
#include <cstdio>
#include <cstring>
#include <thread>
#include <vector>
int main() {
  const size_t n = (1ull << 30) / sizeof(double);
  std::vector<double> a(n, 1.0);
  double best = 1e9, sink = 0;
  for (int r = 0; r < 5; ++r) {
    double s[2] = {0, 0};
    auto t0 = std::chrono::steady_clock::now();
    std::thread th[2];
    for (int k = 0; k < 2; ++k)
      th[k] = std::thread([&, k] {
        double acc0 = 0, acc1 = 0, acc2 = 0, acc3 = 0;
        for (size_t i = k * n / 2; i < (k + 1) * n / 2; i += 4) { acc0 += a[i]; acc1 += a[i + 1]; acc2 += a[i + 2]; acc3 += a[i + 3]; }
        s[k] = acc0 + acc1 + acc2 + acc3;
      });
    for (auto& t : th) t.join();
    double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = dt < best ? dt : best;
    sink += s[0] + s[1];
  }
  std::printf("read %.1f GB/s (1 GiB, 2 threads, best of 5) %g\n", (1ull << 30) / best / 1e9, sink * 0);
}
