"""What a ranged GET costs moto_server (the S3 emulator the tests and benchmarks use), by object size.

Run:  python benchmarks/moto_ranges.py [--range-mib 16] [--sizes 16,64,128,256] [--tries 5]

Real S3 serves a byte range at a cost that depends on the range. moto_server's cost grows
with the whole object, so on it a format that stores larger objects pays more per request
for the same bytes: the reason the ``s3://`` restore row of ``bench_safetensors.py --only
cloud`` differs between formats. Needs ckptcore-testing, moto and boto3 (``pip install -r
requirements-dev.txt``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

MiB = 1 << 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--range-mib", type=int, default=16)
    parser.add_argument("--sizes", default="16,64,128,256", help="object sizes, MiB")
    parser.add_argument("--tries", type=int, default=5)
    args = parser.parse_args()

    import boto3
    from ckptcore_testing import servers

    s3 = servers.start_moto()
    try:
        client = boto3.client("s3", endpoint_url=s3.endpoint, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        client.create_bucket(Bucket="bench")
        print(f"| object | one GET of its first {args.range_mib} MiB: median (min-max) of {args.tries} |")
        print("|---:|---:|")
        for size in (int(s) for s in args.sizes.split(",")):
            client.put_object(Bucket="bench", Key=f"object-{size}", Body=os.urandom(size * MiB))
            seconds = []
            for _ in range(args.tries):
                start = time.perf_counter()
                body = client.get_object(Bucket="bench", Key=f"object-{size}",
                                         Range=f"bytes=0-{min(size, args.range_mib) * MiB - 1}")["Body"].read()
                seconds.append(time.perf_counter() - start)
                assert len(body) == min(size, args.range_mib) * MiB
            ms = [1000 * s for s in seconds]
            print(f"| {size} MiB | {statistics.median(ms):.0f} ms ({min(ms):.0f}-{max(ms):.0f}) |")
    finally:
        s3.stop()


if __name__ == "__main__":
    main()
