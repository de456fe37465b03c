#include "io/mapped_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "core/error.h"

namespace kiln {

MappedFile map_file(const std::filesystem::path& path, size_t min_size, const char* kind) {
  const std::string f = path.string();
  const int fd = ::open(f.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw Error(cat(f, ": cannot open: ", std::strerror(errno)));
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    ::close(fd);
    throw Error(cat(f, ": cannot stat"));
  }
  const size_t size = size_t(st.st_size);
  if (size < min_size) {
    ::close(fd);
    throw Error(
        cat(f, ": truncated ", kind, " file (", size, " bytes, need at least ", min_size, ")"));
  }
  void* m = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (m == MAP_FAILED) throw Error(cat(f, ": mmap failed: ", std::strerror(errno)));
  return {std::shared_ptr<void>(m, [size](void* p) { munmap(p, size); }), size};
}

}  // namespace kiln
