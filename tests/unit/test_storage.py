"""Storage destinations: validation, expansion to names, description and endpoint shapes."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from egressd.core.names import normalize_name
from egressd.core.storage import (
    StorageDestination,
    StorageDestinationType,
    parse_storage_destination,
    storage_host,
)
from egressd.errors import ValidationError

P = "egress.network_access.allowed_storage_destinations[0]"
AZ = "AZURE_STORAGE"
S3 = "AWS_S3"
GCS = "GOOGLE_CLOUD_STORAGE"


@pytest.mark.parametrize(
    ("obj", "names", "describe"),
    [
        (
            {"storage_destination_type": AZ, "azure_storage_account": "lake1", "azure_storage_service": "dfs"},
            ("lake1.dfs.core.windows.net",),
            "AZURE_STORAGE lake1/dfs",
        ),
        (
            {"storage_destination_type": AZ, "azure_storage_account": "lake1", "azure_storage_service": "blob"},
            ("lake1.blob.core.windows.net",),
            "AZURE_STORAGE lake1/blob",
        ),
        (
            {"storage_destination_type": AZ, "azure_storage_account": "abc"},
            ("abc.dfs.core.windows.net", "abc.blob.core.windows.net"),
            "AZURE_STORAGE abc",
        ),
        (
            {"storage_destination_type": AZ, "azure_storage_account": "a" * 24, "azure_storage_service": None},
            (f"{'a' * 24}.dfs.core.windows.net", f"{'a' * 24}.blob.core.windows.net"),
            f"AZURE_STORAGE {'a' * 24}",
        ),
        (
            {"storage_destination_type": S3, "bucket_name": "my-bucket"},
            ("my-bucket.s3.amazonaws.com",),
            "AWS_S3 my-bucket",
        ),
        (
            {"storage_destination_type": S3, "bucket_name": "my-bucket", "region": "us-west-2"},
            (
                "my-bucket.s3.amazonaws.com",
                "my-bucket.s3.us-west-2.amazonaws.com",
                "my-bucket.s3.dualstack.us-west-2.amazonaws.com",
            ),
            "AWS_S3 my-bucket/us-west-2",
        ),
        (
            {"storage_destination_type": S3, "bucket_name": "logs.example.com", "region": "us-gov-west-1"},
            (
                "logs.example.com.s3.amazonaws.com",
                "logs.example.com.s3.us-gov-west-1.amazonaws.com",
                "logs.example.com.s3.dualstack.us-gov-west-1.amazonaws.com",
            ),
            "AWS_S3 logs.example.com/us-gov-west-1",
        ),
        (
            {"storage_destination_type": S3, "bucket_name": "abc", "region": "eu-central-1"},
            ("abc.s3.amazonaws.com", "abc.s3.eu-central-1.amazonaws.com", "abc.s3.dualstack.eu-central-1.amazonaws.com"),
            "AWS_S3 abc/eu-central-1",
        ),
        (
            {"storage_destination_type": GCS, "bucket_name": "my-gcs-bucket"},
            ("storage.googleapis.com", "my-gcs-bucket.storage.googleapis.com"),
            "GOOGLE_CLOUD_STORAGE my-gcs-bucket",
        ),
        (
            {"storage_destination_type": GCS, "bucket_name": "my_bucket.example.com"},
            ("storage.googleapis.com", "my_bucket.example.com.storage.googleapis.com"),
            "GOOGLE_CLOUD_STORAGE my_bucket.example.com",
        ),
    ],
)
def test_valid_destination(obj: dict[str, Any], names: tuple[str, ...], describe: str) -> None:
    dest = parse_storage_destination(obj, P)
    assert dest.names() == names
    assert dest.describe() == describe
    assert all(normalize_name(n) == n for n in names)
    assert parse_storage_destination(dest.to_dict(), P) == dest
    assert dest.to_dict() == {k: v for k, v in obj.items() if v is not None}


def _errors(obj: Any) -> list[str]:
    with pytest.raises(ValidationError) as info:
        parse_storage_destination(obj, P)
    return [str(e) for e in info.value.errors]


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ("lake1", [f"{P}: must be an object, got string"]),
        (None, [f"{P}: must be an object, got null"]),
        ({}, [f"{P}.storage_destination_type: is required"]),
        (
            {"storage_destination_type": "AZURE"},
            [f'{P}.storage_destination_type: "AZURE" must be one of AWS_S3, AZURE_STORAGE, GOOGLE_CLOUD_STORAGE'],
        ),
        (
            {"storage_destination_type": 3},
            [f"{P}.storage_destination_type: 3 must be one of AWS_S3, AZURE_STORAGE, GOOGLE_CLOUD_STORAGE"],
        ),
        ({"storage_destination_type": AZ}, [f"{P}.azure_storage_account: is required for AZURE_STORAGE"]),
        (
            {"storage_destination_type": AZ, "azure_storage_account": "Lake1"},
            [f'{P}.azure_storage_account: "Lake1" must be 3-24 lower-case letters and digits'],
        ),
        (
            {"storage_destination_type": AZ, "azure_storage_account": "ab"},
            [f'{P}.azure_storage_account: "ab" must be 3-24 lower-case letters and digits'],
        ),
        (
            {"storage_destination_type": AZ, "azure_storage_account": "a" * 25},
            [f'{P}.azure_storage_account: "{"a" * 25}" must be 3-24 lower-case letters and digits'],
        ),
        (
            {"storage_destination_type": AZ, "azure_storage_account": "lake-1"},
            [f'{P}.azure_storage_account: "lake-1" must be 3-24 lower-case letters and digits'],
        ),
        (
            {"storage_destination_type": AZ, "azure_storage_account": 12345},
            [f"{P}.azure_storage_account: must be a string, got number"],
        ),
        (
            {"storage_destination_type": AZ, "azure_storage_account": "lake1", "azure_storage_service": "file"},
            [f'{P}.azure_storage_service: "file" must be "dfs" or "blob" (or absent for both)'],
        ),
        (
            {"storage_destination_type": AZ, "azure_storage_account": "lake1", "bucket_name": "b1"},
            [f"{P}.bucket_name: is not used by AZURE_STORAGE (it takes azure_storage_account, azure_storage_service)"],
        ),
        (
            {"storage_destination_type": AZ, "azure_storage_acount": "lake1"},
            [
                f'{P}.azure_storage_acount: unknown field (did you mean "azure_storage_account"?)',
                f"{P}.azure_storage_account: is required for AZURE_STORAGE",
            ],
        ),
        ({"storage_destination_type": S3}, [f"{P}.bucket_name: is required for AWS_S3"]),
        (
            {"storage_destination_type": S3, "bucket_name": "ab"},
            [f'{P}.bucket_name: "ab" is not a valid S3 bucket name (it must be 3-63 characters long)'],
        ),
        (
            {"storage_destination_type": S3, "bucket_name": "My-Bucket"},
            [
                f'{P}.bucket_name: "My-Bucket" is not a valid S3 bucket name '
                "(only lower-case letters, digits, '.' and '-' are allowed)"
            ],
        ),
        (
            {"storage_destination_type": S3, "bucket_name": "my_bucket"},
            [
                f'{P}.bucket_name: "my_bucket" is not a valid S3 bucket name '
                "(only lower-case letters, digits, '.' and '-' are allowed)"
            ],
        ),
        (
            {"storage_destination_type": S3, "bucket_name": "-bucket"},
            [f'{P}.bucket_name: "-bucket" is not a valid S3 bucket name (it must start and end with a letter or digit)'],
        ),
        (
            {"storage_destination_type": S3, "bucket_name": "bucket."},
            [f'{P}.bucket_name: "bucket." is not a valid S3 bucket name (it must start and end with a letter or digit)'],
        ),
        (
            {"storage_destination_type": S3, "bucket_name": "my..bucket"},
            [f"{P}.bucket_name: \"my..bucket\" is not a valid S3 bucket name (it must not contain '..')"],
        ),
        (
            {"storage_destination_type": S3, "bucket_name": "192.168.5.4"},
            [f'{P}.bucket_name: "192.168.5.4" is not a valid S3 bucket name (it must not look like an IP address)'],
        ),
        (
            {"storage_destination_type": S3, "bucket_name": "xn--bucket"},
            [f'{P}.bucket_name: "xn--bucket" is not a valid S3 bucket name (it uses a prefix or suffix that AWS reserves)'],
        ),
        (
            {"storage_destination_type": S3, "bucket_name": "b1", "region": "US-West-2"},
            [
                f'{P}.bucket_name: "b1" is not a valid S3 bucket name (it must be 3-63 characters long)',
                f'{P}.region: "US-West-2" is not an AWS region name like "us-west-2"',
            ],
        ),
        (
            {"storage_destination_type": S3, "bucket_name": "bkt", "region": "uswest2"},
            [f'{P}.region: "uswest2" is not an AWS region name like "us-west-2"'],
        ),
        (
            {"storage_destination_type": S3, "bucket_name": "bkt", "azure_storage_service": "dfs"},
            [f"{P}.azure_storage_service: is not used by AWS_S3 (it takes bucket_name, region)"],
        ),
        ({"storage_destination_type": GCS}, [f"{P}.bucket_name: is required for GOOGLE_CLOUD_STORAGE"]),
        (
            {"storage_destination_type": GCS, "bucket_name": "bkt", "region": "us-central1"},
            [f"{P}.region: is not used by GOOGLE_CLOUD_STORAGE (it takes bucket_name)"],
        ),
        (
            {"storage_destination_type": GCS, "bucket_name": "b" * 64},
            [
                f'{P}.bucket_name: "{"b" * 64}" is not a valid Google Cloud Storage bucket name '
                "(it must be 3-63 characters long, or up to 222 with dots)"
            ],
        ),
        (
            {"storage_destination_type": GCS, "bucket_name": "a." + "b" * 64},
            [
                f'{P}.bucket_name: "a.{"b" * 64}" is not a valid Google Cloud Storage bucket name '
                "(each dot-separated part must be 1-63 characters long)"
            ],
        ),
        (
            {"storage_destination_type": GCS, "bucket_name": "Bkt"},
            [
                f'{P}.bucket_name: "Bkt" is not a valid Google Cloud Storage bucket name '
                "(only lower-case letters, digits, '-', '_' and '.' are allowed)"
            ],
        ),
        (
            {"storage_destination_type": GCS, "bucket_name": "_bkt"},
            [
                f'{P}.bucket_name: "_bkt" is not a valid Google Cloud Storage bucket name '
                "(it must start and end with a letter or digit)"
            ],
        ),
        (
            {"storage_destination_type": GCS, "bucket_name": "my-google-bkt"},
            [
                f'{P}.bucket_name: "my-google-bkt" is not a valid Google Cloud Storage bucket name '
                "(it must not start with 'goog' or contain 'google')"
            ],
        ),
    ],
)
def test_invalid_destination(obj: Any, expected: list[str]) -> None:
    assert _errors(obj) == expected


@pytest.mark.parametrize(
    "bucket",
    ["abc", "a" * 63, "my.bucket.name", "1bucket9", "a-b-c"],
)
def test_s3_bucket_names_accepted(bucket: str) -> None:
    assert parse_storage_destination({"storage_destination_type": S3, "bucket_name": bucket}, P).bucket_name == bucket


@pytest.mark.parametrize(
    "bucket",
    ["abc", "a_b", "a" * 63, ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 30]), "x.y.z"],
)
def test_gcs_bucket_names_accepted(bucket: str) -> None:
    dest = parse_storage_destination({"storage_destination_type": GCS, "bucket_name": bucket}, P)
    assert dest.names()[1] == f"{bucket}.storage.googleapis.com"
    assert normalize_name(dest.names()[1]) == dest.names()[1]


@pytest.mark.parametrize(
    ("name", "host"),
    [
        ("lake1.blob.core.windows.net", "lake1.blob.core.windows.net"),
        ("lake1.dfs.core.windows.net", "lake1.dfs.core.windows.net"),
        ("x.lake1.blob.core.windows.net", "lake1.blob.core.windows.net"),
        ("a.b.lake1.dfs.core.windows.net", "lake1.dfs.core.windows.net"),
        ("blob.core.windows.net", None),
        ("lake1.queue.core.windows.net", None),
        ("my-bucket.s3.amazonaws.com", "my-bucket.s3.amazonaws.com"),
        ("my.dotted.bucket.s3.amazonaws.com", "my.dotted.bucket.s3.amazonaws.com"),
        ("s3.amazonaws.com", "s3.amazonaws.com"),
        ("my-bucket.s3.us-west-2.amazonaws.com", "my-bucket.s3.us-west-2.amazonaws.com"),
        ("my-bucket.s3.dualstack.us-west-2.amazonaws.com", "my-bucket.s3.dualstack.us-west-2.amazonaws.com"),
        ("s3.eu-central-1.amazonaws.com", "s3.eu-central-1.amazonaws.com"),
        ("s3.dualstack.us-gov-west-1.amazonaws.com", "s3.dualstack.us-gov-west-1.amazonaws.com"),
        ("ec2.us-west-2.amazonaws.com", None),
        ("sts.amazonaws.com", None),
        ("amazonaws.com", None),
        ("my-bucket.s3.notaregion.amazonaws.com", None),
        ("storage.googleapis.com", "storage.googleapis.com"),
        ("my-gcs-bucket.storage.googleapis.com", "my-gcs-bucket.storage.googleapis.com"),
        ("www.googleapis.com", None),
        ("pypi.org", None),
        ("com", None),
    ],
)
def test_storage_host(name: str, host: str | None) -> None:
    assert storage_host(name) == host


# -- properties ---------------------------------------------------------------------------------

AZURE_ACCOUNT = st.from_regex(r"[a-z0-9]{3,24}", fullmatch=True)
S3_BUCKET = st.from_regex(r"[a-z0-9][a-z0-9-]{1,40}[a-z0-9]", fullmatch=True).filter(
    lambda b: not b.startswith(("xn--", "sthree-", "amzn-s3-demo-"))
    and not b.endswith(("-s3alias", "--ol-s3", "--x-s3", "--table-s3"))
)
REGION = st.sampled_from(["us-west-2", "eu-central-1", "us-gov-west-1", "ap-southeast-2", None])
GCS_BUCKET = st.from_regex(r"[a-z0-9][a-z0-9_-]{1,40}[a-z0-9]", fullmatch=True).filter(
    lambda b: "google" not in b and not b.startswith("goog")
)

STORAGE = st.one_of(
    st.builds(
        StorageDestination,
        st.just(StorageDestinationType.AZURE_STORAGE),
        azure_storage_account=AZURE_ACCOUNT,
        azure_storage_service=st.sampled_from(["dfs", "blob", None]),
    ),
    st.builds(StorageDestination, st.just(StorageDestinationType.AWS_S3), bucket_name=S3_BUCKET, region=REGION),
    st.builds(StorageDestination, st.just(StorageDestinationType.GOOGLE_CLOUD_STORAGE), bucket_name=GCS_BUCKET),
)


@given(STORAGE)
def test_round_trip_and_every_name_is_a_storage_host(dest: StorageDestination) -> None:
    assert parse_storage_destination(dest.to_dict(), P) == dest
    for name in dest.names():
        assert normalize_name(name) == name
        assert storage_host(name) == name


@given(st.dictionaries(st.sampled_from(["storage_destination_type", "bucket_name", "region", "x"]), st.text()))
def test_parse_raises_only_validation_error(obj: dict[str, str]) -> None:
    try:
        parse_storage_destination(obj, P)
    except ValidationError as exc:
        assert exc.errors and all(e.path.startswith(P) for e in exc.errors)
