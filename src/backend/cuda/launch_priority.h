// The launch priority of the kernels launch_pdl (launch.cuh) launches from this thread: host
// code only, so that host sources set it without the device header.
#pragma once

namespace ernie::cuda {

// The priority launch_pdl gives its launches on this thread (0: the stream's own), set for a
// scope by ScopedLaunchPriority (e.g. the router's kernels ahead of GEMMs queued on other
// streams; a captured graph keeps it when instantiated with
// cudaGraphInstantiateFlagUseNodePriority).
inline thread_local int t_launch_priority = 0;

class ScopedLaunchPriority {
 public:
  explicit ScopedLaunchPriority(int priority) : saved_(t_launch_priority) {
    t_launch_priority = priority;
  }
  ~ScopedLaunchPriority() { end(); }
  ScopedLaunchPriority(const ScopedLaunchPriority&) = delete;
  ScopedLaunchPriority& operator=(const ScopedLaunchPriority&) = delete;
  // Back to the priority before the scope, before its end.
  void end() const { t_launch_priority = saved_; }

 private:
  int saved_;
};

}  // namespace ernie::cuda
