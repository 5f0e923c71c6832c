"""QueueService: queues with a worker credential, minted, rotated and revoked."""

from __future__ import annotations

from jobwire.server.errors import Context, grpc_errors
from jobwire.server.scheduler import Scheduler
from jobwire.v1 import queues_pb2, queues_pb2_grpc


class QueueServicer(queues_pb2_grpc.QueueServiceServicer):
    """Adapts QueueService to the scheduler's `Trust`."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    async def CreateQueue(
        self, request: queues_pb2.CreateQueueRequest, context: Context
    ) -> queues_pb2.CreateQueueResponse:
        async with grpc_errors(context):
            queue, credential = await self.scheduler.trust.create_queue()
            return queues_pb2.CreateQueueResponse(queue=queue, credential=credential)

    async def RotateQueueCredential(
        self, request: queues_pb2.RotateQueueCredentialRequest, context: Context
    ) -> queues_pb2.RotateQueueCredentialResponse:
        async with grpc_errors(context):
            credential = await self.scheduler.trust.rotate(request.queue, request.credential)
            return queues_pb2.RotateQueueCredentialResponse(credential=credential)

    async def RevokeQueueCredential(
        self, request: queues_pb2.RevokeQueueCredentialRequest, context: Context
    ) -> queues_pb2.RevokeQueueCredentialResponse:
        async with grpc_errors(context):
            await self.scheduler.trust.revoke(request.queue, request.credential)
            return queues_pb2.RevokeQueueCredentialResponse()
