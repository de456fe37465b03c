// Ranks in several processes (one per GPU, on one node or many): where a process stands in the
// world, the TCP mesh that connects the ranks (the rank-0 process's commands to the others, and
// on CPUs the collectives), and a Comm over it. NCCL carries the collectives between GPUs.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "graph/comm.h"

namespace kiln {

struct DistEnv {
  int rank = 0, world = 1, local_rank = 0;
  std::string host = "127.0.0.1";  // where rank 0 listens
  int port = 0;
};

// "host:port" (port 0: rank 0 picks a free one); throws naming the text when malformed.
void parse_dist_init(const std::string& s, DistEnv& e);

// This process's place, from KILN_RANK / KILN_WORLD_SIZE / KILN_LOCAL_RANK (set by kiln for the
// ranks it launches) or Open MPI's OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK (mpirun), with
// rank 0's address from KILN_DIST_INIT (host:port). nullopt: not launched as a rank.
std::optional<DistEnv> dist_from_env();

// A TCP connection between every two ranks. Rank 0 listens on host:port; each other rank
// connects to it, says where it listens itself, gets every rank's address, and connects to the
// ranks below it. A peer that closes its connection (its process ended) or sends nothing for
// `timeout` while awaited is an error naming it, never a hang.
class Mesh {
 public:
  explicit Mesh(const DistEnv& e, std::chrono::seconds timeout = std::chrono::seconds(300));
  ~Mesh();
  Mesh(const Mesh&) = delete;
  Mesh& operator=(const Mesh&) = delete;
  int rank() const { return rank_; }
  int size() const { return int(fd_.size()); }
  // The port rank 0 listens on (the one it picked when asked for port 0).
  int port() const { return port_; }

  struct Xfer {
    int peer;
    void* data;  // const for sends
    size_t bytes;
  };
  // Every send and receive at once (poll), so ranks that send each other large buffers do not
  // wait on each other.
  void exchange(const std::vector<Xfer>& sends, const std::vector<Xfer>& recvs);
  void send(int peer, const void* p, size_t n);
  void recv(int peer, void* p, size_t n);
  // Length-prefixed messages.
  void send_msg(int peer, const std::string& m);
  // forever: no timeout (a rank waiting for rank 0's next command, which may be idle).
  std::string recv_msg(int peer, bool forever = false);
  // Whether peer's connection is closed (its process ended), without waiting.
  bool closed(int peer) const;
  // Rank 0 only, before the others connect: called back with the port it listens on.
  static std::unique_ptr<Mesh> accept_after(const DistEnv& e,
                                            const std::function<void(int port)>& listening);

 private:
  Mesh() = default;
  void connect_all(const DistEnv& e, int listen_fd);
  int rank_ = 0, port_ = 0;
  std::vector<int> fd_;  // per peer (-1 for self)
  std::chrono::seconds timeout_{300};
};

// Collectives over the mesh between the CPU ranks of several processes (every member sends its
// buffer to every other; each sums in rank order, so all get the same bits). `ranks`: the
// group's world ranks, ascending.
std::unique_ptr<Comm> make_mesh_comm(Mesh& m, const std::vector<int>& ranks);

}  // namespace kiln
