#!/usr/bin/env python3
"""Write the many-small-files tree of bench/delivery.sh with fresh random content.

    mkdata.py DIR FILES FOLDERS SIZE

(Re)writes FILES files of SIZE bytes, spread evenly over FOLDERS folders
(DIR/d000/f00000.bin ...), each with bytes never written before: Garage stores a block
whose hash it already has only once, so a tool uploading content that an earlier tool
already sent would be measured against a server that skips the disk write. Names stay
the same from run to run; files left over from a bigger tree are removed.

The bytes come from a PRNG seeded from os.urandom (os.urandom itself is 5x slower here
and the content only has to be unique, not secret).
"""

import os
import random
import shutil
import sys


def main():
    if len(sys.argv) != 5:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    root = sys.argv[1]
    files, folders, size = (int(a) for a in sys.argv[2:])
    if files < 1 or folders < 1 or size < 0 or folders > files:
        print("mkdata.py: need FILES >= FOLDERS >= 1 and SIZE >= 0", file=sys.stderr)
        return 2
    rng = random.Random(os.urandom(32))
    wanted = set()
    per_folder, extra = divmod(files, folders)
    n = 0
    for d in range(folders):
        folder = "d%03d" % d
        wanted.add(folder)
        path = os.path.join(root, folder)
        os.makedirs(path, exist_ok=True)
        names = set()
        for _ in range(per_folder + (1 if d < extra else 0)):
            name = "f%05d.bin" % n
            names.add(name)
            with open(os.path.join(path, name), "wb") as f:
                f.write(rng.randbytes(size))
            n += 1
        for stale in set(os.listdir(path)) - names:
            os.remove(os.path.join(path, stale))
    for stale in set(os.listdir(root)) - wanted:
        p = os.path.join(root, stale)
        shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
