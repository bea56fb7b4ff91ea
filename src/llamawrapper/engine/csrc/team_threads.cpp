// The Linux thread ids of the calling thread's OpenMP team, the one torch's parallel regions (and
// oneDNN's) run on, in team order (0: the calling thread): engine/threads.py pins them, one per CPU.
// Built with decode_attention.cpp by engine/kernels.py, which binds it.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

std::vector<int64_t> team_threads() {
  const int n = at::get_num_threads();
  std::vector<int64_t> tids(n, -1);
#ifdef _OPENMP
#pragma omp parallel num_threads(n)
  { tids[omp_get_thread_num()] = static_cast<int64_t>(syscall(SYS_gettid)); }
#else
  tids[0] = static_cast<int64_t>(syscall(SYS_gettid));
#endif
  return tids;
}
