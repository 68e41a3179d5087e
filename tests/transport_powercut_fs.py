"""A FUSE filesystem that behaves like a disk with a volatile write cache: writes stay in this
process's memory until the file is fsynced. Killing this process is the power cut.

    python tests/transport_powercut_fs.py BACKING_DIR MOUNTPOINT

Data reaches BACKING_DIR only through fsync/fdatasync (or a truncate, which is applied at once, as
journalled metadata would be). After a cut, BACKING_DIR holds what a disk would hold when the power
came back. Used by tests/test_transport_powercut.py.
"""

from __future__ import annotations

import errno
import os
import sys
import threading

import mfusepy as fuse

PAGE = 4096


class PowerCutFs(fuse.Operations):
    use_ns = True  # utimens gets nanoseconds
    def __init__(self, root: str) -> None:
        self.root = root
        self._mutex = threading.Lock()
        self.dirty: dict[str, dict[int, bytearray]] = {}  # path -> page number -> page
        self.size: dict[str, int] = {}  # path -> size including unsynced writes

    def _full(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    # -- metadata: straight through ------------------------------------------------------------

    def getattr(self, path, fh=None):
        try:
            st = os.lstat(self._full(path))
        except OSError as exc:
            raise fuse.FuseOSError(exc.errno) from exc
        attrs = {k: getattr(st, k) for k in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_atime", "st_mtime", "st_ctime")}
        with self._mutex:
            if path in self.size:
                attrs["st_size"] = self.size[path]
        return attrs

    def readdir(self, path, fh):
        return [".", "..", *os.listdir(self._full(path))]

    def access(self, path, amode):
        if not os.access(self._full(path), amode):
            raise fuse.FuseOSError(errno.EACCES)

    def statfs(self, path):
        st = os.statvfs(self._full(path))
        return {k: getattr(st, k) for k in ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree",
                                            "f_files", "f_flag", "f_frsize", "f_namemax")}

    def chmod(self, path, mode):
        os.chmod(self._full(path), mode)

    def chown(self, path, uid, gid):
        os.chown(self._full(path), uid, gid)

    def utimens(self, path, times=None):
        os.utime(self._full(path), ns=times) if times else os.utime(self._full(path))

    def mkdir(self, path, mode):
        os.mkdir(self._full(path), mode)

    def rmdir(self, path):
        os.rmdir(self._full(path))

    def unlink(self, path):
        with self._mutex:
            self.dirty.pop(path, None)
            self.size.pop(path, None)
        os.unlink(self._full(path))

    def rename(self, old, new):
        with self._mutex:
            if old in self.dirty:
                self.dirty[new] = self.dirty.pop(old)
            if old in self.size:
                self.size[new] = self.size.pop(old)
        os.rename(self._full(old), self._full(new))

    def open(self, path, flags):
        return os.open(self._full(path), flags & ~(os.O_APPEND))

    def create(self, path, mode, fi=None):
        return os.open(self._full(path), os.O_RDWR | os.O_CREAT, mode)

    def release(self, path, fh):
        os.close(fh)

    def flush(self, path, fh):
        return 0  # close() is not a sync

    # -- data: volatile until fsync -----------------------------------------------------------

    def _page(self, path: str, fh: int, number: int) -> bytearray:
        pages = self.dirty.setdefault(path, {})
        page = pages.get(number)
        if page is None:
            page = bytearray(os.pread(fh, PAGE, number * PAGE).ljust(PAGE, b"\0"))
            pages[number] = page
        return page

    def read(self, path, size, offset, fh):
        with self._mutex:
            end = min(offset + size, self.size.get(path, os.fstat(fh).st_size))
            out = bytearray()
            pos = offset
            pages = self.dirty.get(path, {})
            while pos < end:
                number, within = divmod(pos, PAGE)
                take = min(PAGE - within, end - pos)
                page = pages.get(number)
                chunk = page[within:within + take] if page is not None else os.pread(fh, take, pos).ljust(take, b"\0")
                out += chunk
                pos += take
            return bytes(out)

    def write(self, path, data, offset, fh):
        with self._mutex:
            pos, view = offset, memoryview(data)
            while view:
                number, within = divmod(pos, PAGE)
                take = min(PAGE - within, len(view))
                self._page(path, fh, number)[within:within + take] = view[:take]
                view, pos = view[take:], pos + take
            self.size[path] = max(self.size.get(path, os.fstat(fh).st_size), offset + len(data))
            return len(data)

    def truncate(self, path, length, fh=None):
        with self._mutex:
            pages = self.dirty.get(path, {})
            for number in [n for n in pages if n * PAGE >= length]:
                del pages[number]
            if length % PAGE and length // PAGE in pages:
                page = pages[length // PAGE]
                page[length % PAGE:] = b"\0" * (PAGE - length % PAGE)
            if path in self.size:
                self.size[path] = length
            os.truncate(self._full(path), length)

    def fsync(self, path, datasync, fh):
        with self._mutex:
            pages = self.dirty.pop(path, {})
            size = self.size.pop(path, None)
            for number, page in sorted(pages.items()):
                os.pwrite(fh, bytes(page), number * PAGE)
            if size is not None:
                os.ftruncate(fh, size)
            os.fsync(fh)
        return 0


def main() -> None:
    backing, mountpoint = sys.argv[1], sys.argv[2]
    fuse.FUSE(PowerCutFs(backing), mountpoint, foreground=True, nothreads=True)


if __name__ == "__main__":
    main()
