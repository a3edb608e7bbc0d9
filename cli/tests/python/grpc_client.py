"""A second client in another language: Python grpcio stubs generated from proto/ at test time.

Usage: grpc_client.py COORDINATOR_ADDR PROMPT MAX_TOKENS
Prints one JSON object: {"token_ids": [...], "text": "...", "finish_reason": N}.
"""
import json
import os
import sys
import tempfile

from grpc_tools import protoc
import grpc


def main():
    address, prompt, max_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "proto")
    out = tempfile.mkdtemp()
    protos = ["strata/v1/common.proto", "strata/v1/coordinator.proto", "strata/v1/worker.proto"]
    args = ["protoc", f"-I{root}", f"-I{os.path.dirname(protoc.__file__)}/_proto",
            f"--python_out={out}", f"--grpc_python_out={out}"] + protos
    if protoc.main(args) != 0:
        sys.exit("protoc failed")
    sys.path.insert(0, out)
    from strata.v1 import coordinator_pb2, coordinator_pb2_grpc, common_pb2

    channel = grpc.insecure_channel(address)
    stub = coordinator_pb2_grpc.CoordinatorStub(channel)
    request = coordinator_pb2.GenerateRequest(
        prompt=prompt,
        max_tokens=max_tokens,
        sampling=common_pb2.SamplingParams(temperature=0.0, top_p=1.0),
    )
    ids, text, reason = [], "", None
    for event in stub.Generate(request, timeout=120):
        kind = event.WhichOneof("event")
        if kind == "token":
            ids.append(event.token.id)
            text += event.token.text
        elif kind == "finished":
            text += event.finished.trailing_text
            reason = event.finished.reason
    print(json.dumps({"token_ids": ids, "text": text, "finish_reason": reason}))


if __name__ == "__main__":
    main()
