"""Write the seed corpora of the atheris harnesses into tests/fuzz/corpus/<name>/.

    python tests/fuzz/make_corpus.py        # rewrites the seeds (deterministic); commit the result

The seeds are real inputs: DNS queries and answers built with dnslib, the NFLOG datagrams captured
from the kernel (tests/data/nflog/*.bin), the lab's policy documents, the example config and the
lab's config, and the seed SQL with a few real queries. Files the fuzzer adds while it runs go to a
scratch directory, never here (tests/unit/test_fuzz_atheris.py passes one first).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

from dnslib import AAAA, CNAME, EDNS0, QTYPE, RR, A, DNSHeader, DNSQuestion, DNSRecord, EDNSOption

from egressd.core.config import EXAMPLE_CONFIG
from egressd.lab import world

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
NFLOG_DATA = HERE.parent / "data" / "nflog"

SEED_SQL = ("select * from system.access.outbound_network where event_time >= "
            "current_timestamp() - interval 2 hour sort by event_time desc")


def _query(name: str, qtype: str, qid: int, *, edns: int | None = None, do: bool = False) -> bytes:
    rec = DNSRecord(DNSHeader(id=qid, rd=1), q=DNSQuestion(name, getattr(QTYPE, qtype)))
    if edns is not None:
        rec.add_ar(EDNS0(udp_len=edns, flags="do" if do else "", opts=[EDNSOption(10, b"\x01" * 8)]))
    return rec.pack()


def _answer(name: str, qtype: str, qid: int, records: list[RR], *, rcode: int = 0, tc: bool = False) -> bytes:
    rec = DNSRecord(DNSHeader(id=qid, qr=1, ra=1, rd=1, rcode=rcode, tc=int(tc)),
                    q=DNSQuestion(name, getattr(QTYPE, qtype)), rr=records)
    rec.add_ar(EDNS0(udp_len=1232))
    return rec.pack()


def dns_seeds() -> dict[str, bytes]:
    www = "www.example.com"
    return {
        "query_a": _query(www, "A", 0x1234),
        "query_aaaa_edns_do": _query("pypi.org", "AAAA", 0x0101, edns=1232, do=True),
        "query_https_upper": _query("RAW.GitHubUserContent.COM", "HTTPS", 7),
        "answer_a": _answer(www, "A", 0x1234, [RR(www, QTYPE.A, rdata=A("192.0.2.1"), ttl=30)]),
        "answer_cname_chain": _answer(www, "A", 0x1234, [
            RR(www, QTYPE.CNAME, rdata=CNAME("a.cdn.net"), ttl=60),
            RR("a.cdn.net", QTYPE.CNAME, rdata=CNAME("b.cdn.net"), ttl=60),
            RR("b.cdn.net", QTYPE.A, rdata=A("198.51.100.10"), ttl=20),
            RR("b.cdn.net", QTYPE.AAAA, rdata=AAAA("2001:db8::10"), ttl=40),
        ]),
        "answer_cname_loop": _answer(www, "A", 0x1234, [
            RR(www, QTYPE.CNAME, rdata=CNAME("x.net")),
            RR("x.net", QTYPE.CNAME, rdata=CNAME(www)),
            RR("x.net", QTYPE.A, rdata=A("192.0.2.4")),
        ]),
        "answer_nxdomain": _answer("evil.example", "A", 0x1234, [], rcode=3),
        "answer_truncated": _answer(www, "A", 0x1234, [], tc=True),
    }


def nflog_seeds() -> dict[str, bytes]:
    return {p.stem: p.read_bytes() for p in sorted(NFLOG_DATA.glob("*.bin"))}


def policy_seeds() -> dict[str, bytes]:
    docs = {
        "restricted_etl": world.policy("restricted-etl"),
        "dry_run_dbsql": world.policy("restricted-dryrun", dry_run=True, products=["DBSQL"]),
        "full_access": {"network_policy_id": "default-policy",
                        "egress": {"network_access": {"restriction_mode": "FULL_ACCESS"}}},
        "no_egress": {"network_policy_id": "p1"},
    }
    return {k: json.dumps(v, indent=1).encode() for k, v in docs.items()}


def config_seeds() -> dict[str, bytes]:
    # Every commented example key (tcp_listen, token_file, [[workspaces]], [[workloads]]) switched on.
    uncommented = re.sub(r"(?m)^# (?=\[\[|[a-z_]+ = )", "", EXAMPLE_CONFIG)
    lab = "\n".join([
        'account_id = "lab-account"', 'node = "lab-node-1"',
        "[dns]", 'upstreams = ["203.0.113.2:53", "[2001:db8::53]:53"]', "min_ttl = 30",
        "[api]", 'tcp_listen = "127.0.0.1:9181"', 'token_file = "/etc/egressd/api.token"',
        "[[workspaces]]", 'id = "1001"', 'network_policy_id = "restricted-etl"',
        "[[workloads]]", 'id = "ws1-notebook"', 'workspace_id = "1001"', 'product = "GENERAL_COMPUTE"',
        'sources = ["10.77.1.2/32", "2001:db8:77:1::2/128"]',
    ]) + "\n"
    return {"example": EXAMPLE_CONFIG.encode(), "example_uncommented": uncommented.encode(),
            "lab": lab.encode(), "minimal": b'[dns]\nupstreams = ["192.0.2.1"]\n'}


def sql_seeds() -> dict[str, bytes]:
    queries = {
        "seed": SEED_SQL,
        "group_by": "select destination, count(*) from system.access.outbound_network group by 1 order by 2 desc",
        "cte_join": ("with d as (select * from outbound_network where access_type = 'DROP') "
                     "select d.event_id, o.node from d join outbound_network o on d.event_id = o.event_id"),
        "structs": "select dns_event.domain_name, ip_event.destination_port from outbound_network limit 5",
        "cluster_by": "select * from outbound_network distribute by node sort by event_time cluster by node",
        "refused": "select * from read_csv('/etc/passwd')",
    }
    return {k: v.encode() for k, v in queries.items()}


SEEDS = {"dnsmsg": dns_seeds, "nflog": nflog_seeds, "policy": policy_seeds,
         "config": config_seeds, "sqlguard": sql_seeds}


def write(name: str) -> int:
    out = CORPUS / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    seeds = SEEDS[name]()
    for stem, data in seeds.items():
        (out / f"{stem}-{hashlib.sha1(data).hexdigest()[:8]}").write_bytes(data)
    return len(seeds)


if __name__ == "__main__":
    for name in SEEDS:
        print(f"{name}: {write(name)} seeds")
