"""The StoreAdmin servicer of a shard server (control plane; admin role, store_service/auth.py).

Paths in requests are relative to the server's store root and confined under it
(`store_service.admin_paths`): WriteSnapshot writes only into a staging directory,
PrepareVersion loads only from the root (or a directory inside it).
"""
from __future__ import annotations

from protos import knowledge_store_pb2 as pb
from protos import knowledge_store_pb2_grpc as pb_grpc
from store_service import admin_paths, wire


class StoreAdminServicer(pb_grpc.StoreAdminServicer):
    def __init__(self, rpc):  # server._Rpc
        self._rpc = rpc
        self._shard = rpc.shard

    def _admin(self, method, context, call, request_id=""):
        return self._rpc.handle(method, context, call, admin=True, request_id=request_id)

    def Describe(self, request, context):
        return self._admin("Admin.Describe", context, lambda: wire.description_to_proto(self._shard.describe()))

    def AddRows(self, request, context):
        def call():
            values, keys, bias, options = wire.add_rows_from_proto(request)
            resp = pb.AddRowsResponse()
            wire.to_proto(self._shard.add_rows(values, keys, bias, **options), resp.ids)
            return resp
        return self._admin("AddRows", context, call, request.request_id)

    def SetOptimizer(self, request, context):
        def call():
            bias_step = request.bias_step if request.HasField("bias_step") else None
            old = self._shard.set_optimizer(wire.optimizer_from_proto(request.optimizer), bias_step=bias_step)
            return wire.row_optimizer_to_proto(old)
        return self._admin("SetOptimizer", context, call, request.request_id)

    def _set_flag(self, method, setter, request, context):
        def call():
            setter(wire.from_proto(request.ids, "ids", ids=True, ndim=1), bool(request.value))
            return pb.SetFlagResponse()
        return self._admin(method, context, call, request.request_id)

    def SetFrozen(self, request, context):
        return self._set_flag("SetFrozen", self._shard.set_frozen, request, context)

    def SetAblated(self, request, context):
        return self._set_flag("SetAblated", self._shard.set_ablated, request, context)

    def Usage(self, request, context):
        return self._admin("Usage", context, lambda: wire.usage_to_proto(self._shard.usage()))

    def WriteSnapshot(self, request, context):
        def call():
            path = admin_paths.staging_dir(self._rpc.store_root, request.version_dir,
                                           self._rpc.limits.max_path_chars)
            self._shard.write_snapshot(path, int(request.version), full=bool(request.full))
            return pb.VersionResponse()
        return self._admin("WriteSnapshot", context, call, request.request_id)

    def PrepareVersion(self, request, context):
        def call():
            root = admin_paths.confine(self._rpc.store_root, request.store_root, "store_root",
                                       self._rpc.limits.max_path_chars)
            self._shard.prepare_version(root, int(request.version))
            return pb.VersionResponse()
        return self._admin("PrepareVersion", context, call, request.request_id)

    def FlipVersion(self, request, context):
        def call():
            self._shard.flip_version(int(request.version))
            return pb.VersionResponse()
        return self._admin("FlipVersion", context, call, request.request_id)

    def ReleaseVersion(self, request, context):
        def call():
            self._shard.release_version(int(request.version))
            return pb.VersionResponse()
        return self._admin("ReleaseVersion", context, call, request.request_id)

    def RelabelVersion(self, request, context):
        def call():
            moved = self._shard.relabel_version(int(request.version), int(request.new_version))
            return pb.RelabelVersionResponse(relabelled=moved)
        return self._admin("RelabelVersion", context, call, request.request_id)
