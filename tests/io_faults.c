// An LD_PRELOAD shim that makes chosen system calls fail, for the tests of the failure paths (a
// disk that returns EIO, a network file system whose write returns 0, a directory fsync that
// fails after a rename). It is configured by one environment variable, read once:
//
//   TORCHGUARD_FAULTS="<call>:<path part>:<result>[:<skip>[:<count>]];..."
//
//   call       pread, read, write, fsync, fdatasync, close, rename, link, unlinkat or remove
//   path part  a substring of the file's path (for calls on a descriptor: the target of
//              /proc/self/fd/<fd>; for rename and link: the new name; for unlinkat: the
//              directory's path, '/', the name); ending with '$', its end
//   result     an errno name (EIO, ENOSPC, EDQUOT, EROFS, EACCES, EINVAL, EMLINK, EXDEV,
//              EPERM): the call fails with it;
//              0: the call returns 0 (a write that writes nothing, a read at end of file);
//              HANG: the call blocks until a signal arrives, then fails with EINTR (a hung
//              network file system mounted `intr`);
//              KILL: the process is killed (SIGKILL) before the call: a crash at that point
//   skip       matching calls that go through first (default 0)
//   count      matching calls that fail after those (default: every one)
//
// Every failure it causes is written to stderr ("io_faults: ..."), so that a test can tell that
// the fault happened.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

#define MAX_RULES 8

enum action { FAIL, HANG, KILL };

struct rule {
  char call[16];
  char part[256];
  enum action action;
  int error_number;  // 0: return 0
  long skip;
  long count;  // -1: every one
  atomic_long seen;
};

static struct rule rules[MAX_RULES];
static int rule_count;
static pthread_once_t once = PTHREAD_ONCE_INIT;

static int errno_named(const char* name) {
  static const struct {
    const char* name;
    int value;
  } names[] = {{"EIO", EIO},       {"ENOSPC", ENOSPC}, {"EDQUOT", EDQUOT}, {"EROFS", EROFS},
               {"EACCES", EACCES}, {"EINTR", EINTR},   {"EBADF", EBADF},   {"ENXIO", ENXIO},
               {"EINVAL", EINVAL}, {"EMLINK", EMLINK}, {"EXDEV", EXDEV},   {"EPERM", EPERM}};
  for (size_t i = 0; i < sizeof names / sizeof names[0]; ++i) {
    if (strcmp(name, names[i].name) == 0) return names[i].value;
  }
  return strcmp(name, "0") == 0 ? 0 : EIO;
}

static void parse(void) {
  const char* spec = getenv("TORCHGUARD_FAULTS");
  if (!spec) return;
  char text[2048];
  snprintf(text, sizeof text, "%s", spec);
  char* save_rules = NULL;
  for (char* item = strtok_r(text, ";", &save_rules); item && rule_count < MAX_RULES;
       item = strtok_r(NULL, ";", &save_rules)) {
    struct rule* r = &rules[rule_count];
    char* fields[5] = {0};
    int n = 0;
    for (char* p = item; n < 5; ++n) {
      fields[n] = p;
      p = strchr(p, ':');
      if (!p) {
        ++n;
        break;
      }
      *p++ = '\0';
    }
    if (n < 3) continue;
    snprintf(r->call, sizeof r->call, "%s", fields[0]);
    snprintf(r->part, sizeof r->part, "%s", fields[1]);
    r->action = strcmp(fields[2], "HANG") == 0   ? HANG
                : strcmp(fields[2], "KILL") == 0 ? KILL
                                                 : FAIL;
    r->error_number = r->action == HANG ? EINTR : errno_named(fields[2]);
    r->skip = n > 3 ? atol(fields[3]) : 0;
    r->count = n > 4 ? atol(fields[4]) : -1;
    atomic_init(&r->seen, 0);
    ++rule_count;
  }
}

// The rule that makes this call fail, or NULL.
static struct rule* failing(const char* call, const char* path) {
  pthread_once(&once, parse);
  for (int i = 0; i < rule_count; ++i) {
    struct rule* r = &rules[i];
    if (strcmp(r->call, call) != 0 || !path) continue;
    const size_t part_length = strlen(r->part);
    if (part_length > 0 && r->part[part_length - 1] == '$') {
      const size_t path_length = strlen(path);
      if (path_length < part_length - 1 ||
          strncmp(path + path_length - (part_length - 1), r->part, part_length - 1) != 0) {
        continue;
      }
    } else if (!strstr(path, r->part)) {
      continue;
    }
    const long index = atomic_fetch_add(&r->seen, 1);
    if (index < r->skip || (r->count >= 0 && index >= r->skip + r->count)) return NULL;
    char line[512];
    const int length = snprintf(line, sizeof line, "io_faults: %s('%s') -> %s\n", call, path,
                                r->action == KILL   ? "SIGKILL"
                                : r->action == HANG ? "hang until a signal"
                                : r->error_number   ? strerror(r->error_number)
                                                    : "0");
    ssize_t (*real_write)(int, const void*, size_t) = dlsym(RTLD_NEXT, "write");
    if (length > 0 && real_write) real_write(2, line, (size_t)length);
    if (r->action == KILL) raise(SIGKILL);
    if (r->action == HANG) pause();  // returns once a caught signal's handler has run
    return r;
  }
  return NULL;
}

static struct rule* failing_fd(const char* call, int fd) {
  pthread_once(&once, parse);
  if (rule_count == 0) return NULL;
  char link[64], path[4096];
  snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
  const ssize_t n = readlink(link, path, sizeof path - 1);
  if (n <= 0) return NULL;
  path[n] = '\0';
  return failing(call, path);
}

#define REAL(name, type) ((type)dlsym(RTLD_NEXT, name))

#define FAIL_WITH(r, value)      \
  do {                           \
    if ((r)->error_number) {     \
      errno = (r)->error_number; \
      return -1;                 \
    }                            \
    return (value);              \
  } while (0)

ssize_t pread(int fd, void* buffer, size_t size, off_t offset) {
  struct rule* r = failing_fd("pread", fd);
  if (r) FAIL_WITH(r, 0);
  return REAL("pread", ssize_t(*)(int, void*, size_t, off_t))(fd, buffer, size, offset);
}

ssize_t pread64(int fd, void* buffer, size_t size, off_t offset) {
  struct rule* r = failing_fd("pread", fd);
  if (r) FAIL_WITH(r, 0);
  return REAL("pread64", ssize_t(*)(int, void*, size_t, off_t))(fd, buffer, size, offset);
}

ssize_t read(int fd, void* buffer, size_t size) {
  struct rule* r = failing_fd("read", fd);
  if (r) FAIL_WITH(r, 0);
  return REAL("read", ssize_t(*)(int, void*, size_t))(fd, buffer, size);
}

ssize_t write(int fd, const void* buffer, size_t size) {
  struct rule* r = failing_fd("write", fd);
  if (r) FAIL_WITH(r, 0);
  return REAL("write", ssize_t(*)(int, const void*, size_t))(fd, buffer, size);
}

int fsync(int fd) {
  struct rule* r = failing_fd("fsync", fd);
  if (r) FAIL_WITH(r, 0);
  return REAL("fsync", int (*)(int))(fd);
}

int fdatasync(int fd) {
  struct rule* r = failing_fd("fdatasync", fd);
  if (r) FAIL_WITH(r, 0);
  return REAL("fdatasync", int (*)(int))(fd);
}

int close(int fd) {
  struct rule* r = failing_fd("close", fd);
  if (r) {
    REAL("close", int (*)(int))(fd);  // the descriptor is gone either way, as with a real error
    FAIL_WITH(r, 0);
  }
  return REAL("close", int (*)(int))(fd);
}

int rename(const char* from, const char* to) {
  struct rule* r = failing("rename", to);
  if (r) FAIL_WITH(r, 0);
  return REAL("rename", int (*)(const char*, const char*))(from, to);
}

int link(const char* from, const char* to) {
  struct rule* r = failing("link", to);
  if (r) FAIL_WITH(r, 0);
  return REAL("link", int (*)(const char*, const char*))(from, to);
}

// std::filesystem::remove_all removes a directory's entries with unlinkat(2), relative to the
// directory's descriptor, and the directory itself with remove(3).
int unlinkat(int dirfd, const char* name, int flags) {
  pthread_once(&once, parse);
  if (rule_count > 0) {
    char link[64], path[4096];
    ssize_t n = 0;
    if (name[0] != '/' && dirfd != AT_FDCWD) {
      snprintf(link, sizeof link, "/proc/self/fd/%d", dirfd);
      n = readlink(link, path, sizeof path - 1);
    }
    path[n > 0 ? n : 0] = '\0';
    snprintf(path + strlen(path), sizeof path - strlen(path), "%s%s", n > 0 ? "/" : "", name);
    struct rule* r = failing("unlinkat", path);
    if (r) FAIL_WITH(r, 0);
  }
  return REAL("unlinkat", int (*)(int, const char*, int))(dirfd, name, flags);
}

int remove(const char* path) {
  struct rule* r = failing("remove", path);
  if (r) FAIL_WITH(r, 0);
  return REAL("remove", int (*)(const char*))(path);
}
