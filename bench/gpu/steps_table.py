"""The moelab rows of a device script's speed table: for each run folder given, the medians of
tok/s, MFU and step time over steps 10+, the peak memory and the last step's loss, as markdown table rows (a header
first). A folder without steps past 10 is listed as failed.

  python3 bench/gpu/steps_table.py /tmp/speed/*
"""
import json, os, statistics as st, sys

print("| run | median tok/s (steps 10+) | mfu % | median dt ms | peak MiB | last loss |")
print("| --- | ---: | ---: | ---: | ---: | ---: |")
for d in sorted(sys.argv[1:]):
    path = os.path.join(d, "metrics.jsonl")
    recs = [json.loads(l) for l in open(path) if '"event":"step"' in l] if os.path.exists(path) else []
    tail = [r for r in recs if r["step"] >= 10]
    if not tail:
        print(f"| {os.path.basename(d)} | failed | | | | |")
        continue
    print(f"| moelab {os.path.basename(d)} | {st.median(r['tok_sec'] for r in tail):,.0f} "
          f"| {st.median(r['mfu'] or 0 for r in tail):.2f} | {st.median(r['dt_ms'] for r in tail):.1f} "
          f"| {max(r['peak_mem_mib'] for r in recs):,.0f} | {recs[-1]['raw_loss']:.4f} |")
