"""Packaging for the PanDA pilot with its Yoda-Droid MPI mode."""

from setuptools import find_packages, setup

setup(
    name="panda-hpc-pilot",
    version="0.1.0",
    description="PanDA pilot for the grid and HPC, with a Yoda-Droid MPI mode",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(
        include=["pilot", "pilot.*", "yoda", "yoda.*", "droid", "droid.*", "hpc", "hpc.*"]
    ),
    package_data={
        "pilot": ["payloads/*.json", "commission/templates/*.json"],
        "hpc": ["scripts/*.sh"],
    },
    install_requires=[
        "numpy>=1.22",
        "requests>=2.25",
        "psutil>=5.9",
        # orjson: getEventRanges answers of thousands of ranges are decoded all the
        # time; it builds them 1.7x faster than the standard library (see
        # pilot/comm/rangejson.py, which falls back to json without it)
        "orjson>=3.9",
        # pyzmq: AthenaMP reaches the pilot through yampl, whose LOCAL transport is
        # ZeroMQ (ZMTP over ipc:///tmp/zmq_<channel>); pyzmq bundles libzmq, and a
        # protocol of that weight is not one to write again
        "pyzmq>=22",
        # waitress: a production WSGI server for the embedded dispatcher;
        # http.server is documented as not fit for that.
        "waitress>=2.1",
    ],
    extras_require={
        "mpi": ["mpi4py>=3.1", "openmpi>=5.0"],
        # rucio-clients: the rucio copytool talks to Rucio through its own client
        # API (download by DID with checksum checks, upload with registration);
        # writing our own against the REST API would repeat what it does and miss
        # its RSE protocol plugins. The tests bring up the matching server themselves.
        "rucio": ["rucio-clients>=41,<42"],
        "test": [
            "pytest>=7",
            "mpi4py>=3.1",
            "openmpi>=5.0",
            "matplotlib>=3.5",
            "rucio-clients>=41,<42",
        ],
        "dev": [
            "pytest>=7",
            "ruff",
            "mpi4py>=3.1",
            "openmpi>=5.0",
            "matplotlib>=3.5",
            "rucio-clients>=41,<42",
        ],
        # the timeline picture of `pilot demo`: matplotlib draws it far better
        # than code of our own would
        "demo": ["matplotlib>=3.5"],
    },
    entry_points={"console_scripts": ["pilot=pilot.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Physics",
        "Topic :: System :: Distributed Computing",
    ],
)
