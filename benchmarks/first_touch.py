"""What fresh memory costs on this machine: the first touch of 1 GiB, some seconds after 1 GiB was freed.

Run:  python benchmarks/first_touch.py [--gib 1] [--waits 0,0.5,2,5] [--tries 3]

Every restore fills fresh memory (its results, and the buffers of the libraries it reads
through), so on a virtual machine whose host takes freed memory back, a restore's time
depends on how long ago the process's memory was freed. This prints, for 4 KiB pages and
for transparent huge pages (what NumPy asks for on large arrays), the seconds per GiB to
touch an anonymous mapping after freeing one of the same size and waiting, and how much
memory the guest reported free to its host meanwhile (``virtio_balloon`` free page
reporting, where the kernel has it). Nothing here is ckptcore: it is the floor under every
row of the other benchmarks that allocates.
"""

from __future__ import annotations

import argparse
import mmap
import statistics
import time

REPORTED = "/sys/module/page_reporting/parameters/reported_kib"
PAGE = 4096


def reported_gib() -> float | None:
    """GiB the guest has reported free to its host so far, or None without free page reporting."""
    try:
        with open(REPORTED) as f:
            return int(f.read()) / 2**20
    except OSError:
        return None


def touch(nbytes: int, huge: bool) -> float:
    """Seconds to write one byte per 4 KiB page of a fresh anonymous mapping (freed afterwards)."""
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    memory.madvise(mmap.MADV_HUGEPAGE if huge else mmap.MADV_NOHUGEPAGE)
    start = time.perf_counter()
    for offset in range(0, nbytes, PAGE):
        memory[offset] = 1
    seconds = time.perf_counter() - start
    memory.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--waits", default="0,0.5,2,5", help="seconds between the free and the touch")
    parser.add_argument("--tries", type=int, default=3)
    args = parser.parse_args()
    nbytes = int(args.gib * 2**30) // PAGE * PAGE
    print("| pages | wait after a free | first touch, s/GiB: median (min-max) | reported to the host meanwhile |")
    print("|---|---:|---:|---:|")
    for huge in (False, True):
        for wait in (float(w) for w in args.waits.split(",")):
            seconds, reported = [], []
            for _ in range(args.tries):
                touch(nbytes, huge)  # this memory is freed now
                before = reported_gib()
                time.sleep(wait)
                after = reported_gib()
                seconds.append(touch(nbytes, huge) / args.gib)
                if before is not None and after is not None:
                    reported.append(after - before)
            spread = f"{statistics.median(seconds):.2f} ({min(seconds):.2f}-{max(seconds):.2f})"
            shown = f"{statistics.median(reported):.2f} GiB" if reported else "(no free page reporting)"
            print(f"| {'2 MiB (THP)' if huge else '4 KiB'} | {wait:g} s | {spread} | {shown} |")


if __name__ == "__main__":
    main()
