"""Build hook: ship the repository's top-level `profiles/*.toml` inside the package, as `losa_deploy/profiles_data/`,
so an installed wheel finds them (`losa_deploy.profiles.profile_dirs`). Everything else is in pyproject.toml."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PROFILES = Path(__file__).resolve().parent / "profiles"


class BuildPyWithProfiles(build_py):
    """`build_py`, then copy profiles/*.toml into the built package (one copy of the files in the source tree)."""

    def run(self) -> None:
        super().run()
        dst = Path(self.build_lib) / "losa_deploy" / "profiles_data"
        self.mkpath(str(dst))
        for src in sorted(PROFILES.glob("*.toml")):
            self.copy_file(str(src), str(dst / src.name))


setup(cmdclass={"build_py": BuildPyWithProfiles})
