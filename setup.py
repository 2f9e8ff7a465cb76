"""SocketProxy: fan every TCP source out to several destinations."""
from setuptools import setup

setup(
    name="socketproxy",
    version="0.1.0",
    description="TCP fan-out proxy: one receiver process per source, one forwarder per destination",
    py_modules=["socketproxy", "receiver", "forwarder", "forking", "endpoints", "proxylog", "zerocopy"],
    packages=["fakes"],
    python_requires=">=3.10",
    install_requires=["psutil>=5.9", "docopt-ng>=0.9", "setproctitle>=1.3"],
    extras_require={"test": ["pytest>=7", "pytest-timeout>=2", "hypothesis>=6"]},
    entry_points={
        "console_scripts": [
            "socketproxy=socketproxy:main",
            "fake-source=fakes.source:main",
            "fake-destination=fakes.destination:main",
        ]
    },
)
