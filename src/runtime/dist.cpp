#include "runtime/dist.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "core/dtype.h"
#include "core/error.h"

namespace kiln {

void parse_dist_init(const std::string& s, DistEnv& e) {
  const size_t c = s.rfind(':');
  KILN_CHECK(c != std::string::npos && c > 0 && c + 1 < s.size(), "--dist-init '", s,
             "' is not host:port");
  char* end = nullptr;
  const long port = std::strtol(s.c_str() + c + 1, &end, 10);
  KILN_CHECK(*end == 0 && port >= 0 && port <= 65535, "--dist-init '", s,
             "': the port is not a number in 0 .. 65535");
  e.host = s.substr(0, c);
  e.port = int(port);
}

namespace {

std::optional<int> env_int(const char* name) {
  const char* v = std::getenv(name);
  if (!v || !*v) return std::nullopt;
  char* end = nullptr;
  const long x = std::strtol(v, &end, 10);
  KILN_CHECK(*end == 0 && x >= 0 && x < (1 << 20), "environment variable ", name, "='", v,
             "' is not a rank number");
  return int(x);
}

[[noreturn]] void sys_fail(const std::string& what) {
  throw Error(cat(what, ": ", std::strerror(errno)));
}

void set_nodelay(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

// Listens on host:port (port 0: any free one); returns the socket and the port.
std::pair<int, int> listen_on(const std::string& host, int port) {
  addrinfo hints{}, *res = nullptr;
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  const int rc = getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res);
  KILN_CHECK(rc == 0, "--dist-init ", host, ":", port, ": ", gai_strerror(rc));
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (bind(fd, res->ai_addr, res->ai_addrlen) != 0) {
    freeaddrinfo(res);
    close(fd);
    sys_fail(cat("rank 0 cannot listen on ", host, ":", port));
  }
  freeaddrinfo(res);
  if (listen(fd, 256) != 0) sys_fail("listen");
  sockaddr_in a{};
  socklen_t len = sizeof a;
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  return {fd, ntohs(a.sin_port)};
}

int connect_to(const std::string& host, int port, std::chrono::seconds timeout) {
  addrinfo hints{}, *res = nullptr;
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  const int rc = getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res);
  KILN_CHECK(rc == 0, "rank address ", host, ":", port, ": ", gai_strerror(rc));
  const auto until = std::chrono::steady_clock::now() + timeout;
  for (;;) {  // the listener may not be up yet: retry until the timeout
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(fd, res->ai_addr, res->ai_addrlen) == 0) {
      freeaddrinfo(res);
      set_nodelay(fd);
      return fd;
    }
    close(fd);
    if (std::chrono::steady_clock::now() > until) {
      freeaddrinfo(res);
      throw Error(
          cat("cannot reach rank 0 at ", host, ":", port, " within ", timeout.count(), " s"));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

// Waits for a connection on listen_fd (or throws after the timeout).
int accept_one(int listen_fd, std::chrono::seconds timeout, int expect) {
  pollfd p{listen_fd, POLLIN, 0};
  const int r = poll(&p, 1, int(timeout.count() * 1000));
  KILN_CHECK(r > 0, "waited ", timeout.count(), " s for ", expect,
             " more ranks to connect; are they started (mpirun -np, or kiln's own launch)?");
  const int fd = accept(listen_fd, nullptr, nullptr);
  if (fd < 0) sys_fail("accept");
  set_nodelay(fd);
  return fd;
}

void write_all(int fd, const void* p, size_t n, int peer) {
  const char* c = static_cast<const char*>(p);
  while (n) {
    const ssize_t w = ::send(fd, c, n, MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) throw Error(cat("rank ", peer, " closed its connection (its process ended)"));
    c += w, n -= size_t(w);
  }
}

void read_all(int fd, void* p, size_t n, int peer, std::chrono::seconds timeout) {
  char* c = static_cast<char*>(p);
  while (n) {
    pollfd q{fd, POLLIN, 0};
    const int r = poll(&q, 1, timeout.count() < 0 ? -1 : int(timeout.count() * 1000));
    if (r < 0 && errno == EINTR) continue;
    KILN_CHECK(r > 0, "rank ", peer, " sent nothing for ", timeout.count(), " s");
    const ssize_t got = ::recv(fd, c, n, 0);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) throw Error(cat("rank ", peer, " closed its connection (its process ended)"));
    c += got, n -= size_t(got);
  }
}

}  // namespace

std::optional<DistEnv> dist_from_env() {
  DistEnv e;
  std::optional<int> rank = env_int("KILN_RANK"), world = env_int("KILN_WORLD_SIZE"),
                     local = env_int("KILN_LOCAL_RANK");
  if (!rank) {
    rank = env_int("OMPI_COMM_WORLD_RANK");
    world = env_int("OMPI_COMM_WORLD_SIZE");
    local = env_int("OMPI_COMM_WORLD_LOCAL_RANK");
  }
  if (!rank || !world) return std::nullopt;
  KILN_CHECK(*world >= 1 && *rank < *world, "rank ", *rank, " of a world of ", *world);
  e.rank = *rank, e.world = *world, e.local_rank = local.value_or(0);
  const char* init = std::getenv("KILN_DIST_INIT");
  KILN_CHECK(init && *init, "rank ", e.rank, " of ", e.world,
             ": set KILN_DIST_INIT=host:port, where rank 0 listens (mpirun -x KILN_DIST_INIT)");
  parse_dist_init(init, e);
  return e;
}

std::unique_ptr<Mesh> Mesh::accept_after(const DistEnv& e,
                                         const std::function<void(int)>& listening) {
  KILN_CHECK(e.rank == 0, "only rank 0 listens");
  std::unique_ptr<Mesh> m(new Mesh());
  const auto [fd, port] = listen_on(e.host, e.port);
  m->port_ = port;
  try {
    if (listening) listening(port);
    m->connect_all(e, fd);
  } catch (...) {
    close(fd);
    throw;
  }
  close(fd);
  return m;
}

Mesh::Mesh(const DistEnv& e, std::chrono::seconds timeout) : timeout_(timeout) {
  if (e.rank == 0) {
    const auto [fd, port] = listen_on(e.host, e.port);
    port_ = port;
    try {
      connect_all(e, fd);
    } catch (...) {
      close(fd);
      throw;
    }
    close(fd);
    return;
  }
  connect_all(e, -1);
}

void Mesh::connect_all(const DistEnv& e, int listen_fd) {
  rank_ = e.rank;
  fd_.assign(size_t(e.world), -1);
  const int W = e.world;
  if (W == 1) return;
  // Each rank's listening address: rank 0's is e; the others report theirs to rank 0.
  std::vector<std::pair<std::string, int>> addr(static_cast<size_t>(W));
  if (rank_ == 0) {
    for (int k = 1; k < W; ++k) {
      const int fd = accept_one(listen_fd, timeout_, W - k);
      int32_t hello[3];
      read_all(fd, hello, sizeof hello, -1, timeout_);
      KILN_CHECK(
          hello[0] == 0x6b696c6e && hello[1] > 0 && hello[1] < W && fd_[size_t(hello[1])] < 0,
          "a connection that is not a kiln rank of this world (rank ", hello[1], ")");
      fd_[size_t(hello[1])] = fd;
      sockaddr_in a{};
      socklen_t len = sizeof a;
      getpeername(fd, reinterpret_cast<sockaddr*>(&a), &len);
      char host[INET_ADDRSTRLEN] = {};
      inet_ntop(AF_INET, &a.sin_addr, host, sizeof host);
      addr[size_t(hello[1])] = {host, hello[2]};
    }
    std::string table;
    for (int k = 1; k < W; ++k)
      table += cat(addr[size_t(k)].first, " ", addr[size_t(k)].second, "\n");
    for (int k = 1; k < W; ++k) send_msg(k, table);
    return;
  }
  // Listen for the ranks above this one, then report to rank 0.
  const auto [lfd, lport] = listen_on("0.0.0.0", 0);
  try {
    fd_[0] = connect_to(e.host, e.port, timeout_);
    const int32_t hello[3] = {0x6b696c6e, rank_, lport};
    write_all(fd_[0], hello, sizeof hello, 0);
    const std::string table = recv_msg(0);
    size_t pos = 0;
    for (int k = 1; k < W; ++k) {
      const size_t sp = table.find(' ', pos), nl = table.find('\n', sp);
      KILN_CHECK(sp != std::string::npos && nl != std::string::npos, "rank 0 sent a bad table");
      addr[size_t(k)] = {table.substr(pos, sp - pos), std::stoi(table.substr(sp + 1, nl - sp - 1))};
      pos = nl + 1;
    }
    for (int k = 1; k < rank_; ++k) {  // connect down, saying who this is
      fd_[size_t(k)] = connect_to(addr[size_t(k)].first, addr[size_t(k)].second, timeout_);
      write_all(fd_[size_t(k)], &rank_, 4, k);
    }
    for (int k = rank_ + 1; k < W; ++k) {  // accept from above
      const int fd = accept_one(lfd, timeout_, W - k);
      int32_t who = -1;
      read_all(fd, &who, 4, -1, timeout_);
      KILN_CHECK(who > rank_ && who < W && fd_[size_t(who)] < 0, "a bad rank ", who,
                 " connected to rank ", rank_);
      fd_[size_t(who)] = fd;
    }
  } catch (...) {
    close(lfd);
    throw;
  }
  close(lfd);
}

Mesh::~Mesh() {
  for (int fd : fd_)
    if (fd >= 0) close(fd);
}

void Mesh::send(int peer, const void* p, size_t n) {
  write_all(fd_[size_t(peer)], p, n, peer);
}

void Mesh::recv(int peer, void* p, size_t n) {
  read_all(fd_[size_t(peer)], p, n, peer, timeout_);
}

void Mesh::send_msg(int peer, const std::string& m) {
  const uint64_t n = m.size();
  send(peer, &n, 8);
  send(peer, m.data(), m.size());
}

std::string Mesh::recv_msg(int peer, bool forever) {
  uint64_t n = 0;
  read_all(fd_[size_t(peer)], &n, 8, peer, forever ? std::chrono::seconds(-1) : timeout_);
  KILN_CHECK(n < (uint64_t(1) << 40), "rank ", peer, " sent a message of ", n, " bytes");
  std::string m(size_t(n), '\0');
  recv(peer, m.data(), m.size());
  return m;
}

bool Mesh::closed(int peer) const {
  const int fd = fd_[size_t(peer)];
  pollfd p{fd, POLLRDHUP, 0};
  return poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR));
}

void Mesh::exchange(const std::vector<Xfer>& sends, const std::vector<Xfer>& recvs) {
  std::vector<size_t> sent(sends.size(), 0), got(recvs.size(), 0);
  for (;;) {
    std::vector<pollfd> p;
    std::vector<std::pair<bool, size_t>> what;  // (is send, index)
    for (size_t i = 0; i < sends.size(); ++i)
      if (sent[i] < sends[i].bytes)
        p.push_back({fd_[size_t(sends[i].peer)], POLLOUT, 0}), what.push_back({true, i});
    for (size_t i = 0; i < recvs.size(); ++i)
      if (got[i] < recvs[i].bytes)
        p.push_back({fd_[size_t(recvs[i].peer)], POLLIN, 0}), what.push_back({false, i});
    if (p.empty()) return;
    const int r = poll(p.data(), p.size(), int(timeout_.count() * 1000));
    if (r < 0 && errno == EINTR) continue;
    KILN_CHECK(r > 0, "a collective waited ", timeout_.count(), " s for the other ranks");
    for (size_t k = 0; k < p.size(); ++k) {
      if (!p[k].revents) continue;
      const auto [is_send, i] = what[k];
      if (is_send) {
        const Xfer& x = sends[i];
        const ssize_t w = ::send(p[k].fd, static_cast<const char*>(x.data) + sent[i],
                                 x.bytes - sent[i], MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0 && (errno == EAGAIN || errno == EINTR)) continue;
        if (w <= 0) throw Error(cat("rank ", x.peer, " closed its connection (its process ended)"));
        sent[i] += size_t(w);
      } else {
        const Xfer& x = recvs[i];
        const ssize_t g =
            ::recv(p[k].fd, static_cast<char*>(x.data) + got[i], x.bytes - got[i], MSG_DONTWAIT);
        if (g < 0 && (errno == EAGAIN || errno == EINTR)) continue;
        if (g <= 0) throw Error(cat("rank ", x.peer, " closed its connection (its process ended)"));
        got[i] += size_t(g);
      }
    }
  }
}

namespace {

class MeshComm final : public Comm {
 public:
  MeshComm(Mesh& m, std::vector<int> ranks) : m_(m), ranks_(std::move(ranks)) {
    for (size_t i = 0; i < ranks_.size(); ++i)
      if (ranks_[i] == m.rank()) me_ = int(i);
    KILN_CHECK(me_ >= 0, "rank ", m.rank(), " is not in the group it joins");
  }
  int rank() const override { return me_; }
  int size() const override { return int(ranks_.size()); }

  void all_reduce_sum(void* buf, int64_t count, DType t) override {
    if (size() == 1) return;
    const size_t bytes = size_t(count) * dtype_size(t);
    std::vector<std::vector<char>> in(ranks_.size());
    gather(buf, bytes, in);
    std::vector<float> sum(static_cast<size_t>(count), 0.0f), part(static_cast<size_t>(count));
    for (size_t r = 0; r < ranks_.size(); ++r) {  // rank order: the same bits on every rank
      const void* p = int(r) == me_ ? buf : in[r].data();
      to_f32(t, p, part.data(), size_t(count));
      for (int64_t i = 0; i < count; ++i) sum[size_t(i)] += part[size_t(i)];
    }
    from_f32(t, sum.data(), buf, size_t(count));
  }
  void all_gather(const void* send, void* recv, size_t bytes) override {
    std::vector<std::vector<char>> in(ranks_.size());
    gather(send, bytes, in);
    for (size_t r = 0; r < ranks_.size(); ++r)
      std::memcpy(static_cast<char*>(recv) + r * bytes, int(r) == me_ ? send : in[r].data(), bytes);
  }
  void send(const void* buf, size_t bytes, int peer) override {
    m_.send(ranks_[size_t(peer)], buf, bytes);
  }
  void recv(void* buf, size_t bytes, int peer) override {
    m_.recv(ranks_[size_t(peer)], buf, bytes);
  }

 private:
  // Every other member's `bytes` into in[r].
  void gather(const void* mine, size_t bytes, std::vector<std::vector<char>>& in) {
    std::vector<Mesh::Xfer> s, r;
    for (size_t k = 0; k < ranks_.size(); ++k) {
      if (int(k) == me_) continue;
      in[k].resize(bytes);
      s.push_back({ranks_[k], const_cast<void*>(mine), bytes});
      r.push_back({ranks_[k], in[k].data(), bytes});
    }
    m_.exchange(s, r);
  }
  Mesh& m_;
  std::vector<int> ranks_;
  int me_ = -1;
};

}  // namespace

std::unique_ptr<Comm> make_mesh_comm(Mesh& m, const std::vector<int>& ranks) {
  return std::make_unique<MeshComm>(m, ranks);
}

}  // namespace kiln
