"""The supervisor's memory: the pages of its files that only it maps, given back."""

import subprocess
import sys
import textwrap


def test_pages_only_this_process_maps_are_given_back_and_read_again(tmp_path):
    """A file of 8 MB mapped and read by this process alone: ``page_out_files`` reclaims its
    pages (resident before, not after), and the mapping reads the same bytes afterwards. Run in
    a process of its own, so that the measure is of that process alone."""
    data = tmp_path / "data.bin"
    script = textwrap.dedent(
        f"""
        import mmap, os, re
        from convserve.service.server import page_out_files

        with open({str(data)!r}, "wb") as f:
            f.write(bytes(range(256)) * 32768)  # 8 MB
            f.flush()
            os.fsync(f.fileno())  # clean pages: reclaimed without a write
        with open({str(data)!r}, "rb") as f:
            view = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        checksum = sum(view[i] for i in range(0, len(view), 4096))  # every page read

        def resident_kb():
            smaps = open("/proc/self/smaps").read()
            block = smaps.split({str(data)!r}, 1)[1].split("VmFlags", 1)[0]
            return int(re.search(r"^Rss:\\s+(\\d+)", block, re.M).group(1))

        before = resident_kb()
        released = page_out_files()
        after = resident_kb()
        again = sum(view[i] for i in range(0, len(view), 4096))
        print(before, after, released, checksum == again)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    before, after, released = int(out[0]), int(out[1]), int(out[2])
    assert before >= 8 * 1024 - 4
    assert after < 512, f"{after} KB of the mapping still resident"
    assert released >= 7 * 2**20
    assert out[3] == "True"
