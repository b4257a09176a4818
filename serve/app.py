"""The FastAPI application: one static page, `POST /api/predict` (multipart field `file`), `GET /api/health`.
Uploads are read into memory under a size cap and parsed there (never spooled to disk); a token, when set, is
checked on every request; every bad upload is a 4xx with a one-line reason. Decodes are capped (serve.gate): a
request waits in a bounded queue for a slot, else gets 503 with Retry-After.
"""

import hmac
from dataclasses import dataclass
from pathlib import Path

from serve.gate import DEFAULT_MAX_QUEUED, DEFAULT_MAX_WAIT_S, Busy, DecodeGate, default_max_decodes, trim_heap

STATIC = Path(__file__).resolve().parent / "static"
NOTICE = ("Research software, not a medical device: these are a model's scores on one image, not a diagnosis. "
          "Do not use them for patient care.")
STATUS = {"empty": 400, "too_large": 413, "unsupported": 415, "undecodable": 422}
COOKIE = "serve_token"
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
                    "Cache-Control": "no-store",
                    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
                                               "frame-ancestors 'none'"}


@dataclass(frozen=True)
class ServeConfig:
    token: str | None = None
    max_upload_bytes: int = 32 << 20
    k: int = 6
    max_decodes: int = 0          # decodes at once; 0 = the CPUs this process may use
    max_queued: int = DEFAULT_MAX_QUEUED      # uploads waiting for a decode slot (their bytes are held)
    max_wait_s: float = DEFAULT_MAX_WAIT_S    # longest wait for a slot before 503


class UploadError(ValueError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def parse_multipart_file(body: bytes, content_type: str, field: str = "file") -> bytes:
    """The bytes of multipart field ``field`` from an in-memory body (python-multipart's streaming parser with
    in-memory callbacks: nothing touches the disk)."""
    from python_multipart.multipart import MultipartParser, parse_options_header
    ctype, params = parse_options_header(content_type or "")
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise UploadError(415, "expected a multipart/form-data upload with a 'file' field")
    parts: list[dict] = []
    header: list[bytes] = [b"", b""]

    def on_part_begin():
        parts.append({"headers": {}, "data": bytearray()})

    def on_header_field(data, start, end):
        header[0] += data[start:end]

    def on_header_value(data, start, end):
        header[1] += data[start:end]

    def on_header_end():
        parts[-1]["headers"][header[0].decode("latin-1").lower()] = header[1]
        header[0], header[1] = b"", b""

    def on_part_data(data, start, end):
        parts[-1]["data"] += data[start:end]
    parser = MultipartParser(params[b"boundary"], callbacks={
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_part_data": on_part_data})
    try:
        parser.write(body)
        parser.finalize()
    except Exception:  # noqa: BLE001 - any framing error is the same bad request
        raise UploadError(400, "malformed multipart body") from None
    for part in parts:
        _, disp = parse_options_header(part["headers"].get("content-disposition", b""))
        if disp.get(b"name", b"").decode("latin-1") == field:
            return bytes(part["data"])
    raise UploadError(400, f"no '{field}' field in the upload")


def _token_ok(request, token: str) -> bool:
    given = (request.headers.get("x-token") or request.query_params.get("token") or request.cookies.get(COOKIE) or "")
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        given = auth[7:]
    return hmac.compare_digest(given.encode(), token.encode())


def create_app(predictor, config: ServeConfig = ServeConfig(), neighbours=None):
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse
    from starlette.concurrency import run_in_threadpool

    from eval.predict import InputError
    app = FastAPI(title="cxr-ssl serve", docs_url=None, redoc_url=None, openapi_url=None)
    bundle = predictor.bundle
    gate = DecodeGate(config.max_decodes or default_max_decodes(), config.max_queued, config.max_wait_s)
    app.state.gate = gate

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if config.token is not None and not _token_ok(request, config.token):
            response = JSONResponse({"error": "missing or wrong token"}, status_code=401)
        else:
            response = await call_next(request)
            if config.token is not None and request.query_params.get("token") and request.url.path == "/":
                # The page's own requests (script, API) then carry the token without it showing in URLs or logs.
                response.set_cookie(COOKIE, config.token, httponly=True, samesite="strict")
        response.headers.update(SECURITY_HEADERS)
        return response

    @app.get("/")
    def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/app.js")
    def script():
        return FileResponse(STATIC / "app.js", media_type="text/javascript")

    @app.get("/app.css")
    def style():
        return FileResponse(STATIC / "app.css", media_type="text/css")

    @app.get("/api/health")
    def health():
        return {"status": "ok", "model": bundle.meta["encoder"]["name"], "protocol": bundle.meta["protocol"],
                "tasks": bundle.tasks, "neighbours": 0 if neighbours is None else len(neighbours.keys)}

    @app.post("/api/predict")
    async def predict(request: Request):
        try:
            declared = int(request.headers.get("content-length") or 0)
            if declared > config.max_upload_bytes:
                raise UploadError(413, f"upload of {declared} bytes exceeds the limit of {config.max_upload_bytes}")
            gate.enter_queue()
            try:
                body = bytearray()
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > config.max_upload_bytes:
                        raise UploadError(413, f"upload exceeds the limit of {config.max_upload_bytes} bytes")
                data = parse_multipart_file(bytes(body), request.headers.get("content-type", ""))
                del body
                await gate.acquire()
            finally:
                gate.leave_queue()
            try:
                return await run_in_threadpool(_predict_trimmed, predictor, data, config.k, neighbours)
            finally:
                gate.release()
        except Busy as e:
            return JSONResponse({"error": str(e)}, status_code=503, headers={"Retry-After": str(e.retry_after_s)})
        except UploadError as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)
        except InputError as e:
            return JSONResponse({"error": str(e)}, status_code=STATUS.get(e.kind, 400))
        except Exception:  # noqa: BLE001 - a defect here must not echo upload contents (or a header) back
            return JSONResponse({"error": "internal error while reading the image"}, status_code=500)
    return app


def _predict_trimmed(predictor, data: bytes, k: int, neighbours) -> dict:
    try:
        return _predict_one(predictor, data, k, neighbours)
    finally:
        trim_heap()


def _predict_one(predictor, data: bytes, k: int, neighbours) -> dict:
    from eval.bundle import SALIENCY_TEXT
    from serve.render import data_url, overlay, png_url
    x = predictor.prepare(data)
    out = predictor.predict(x[None])
    bundle = predictor.bundle
    shown = predictor.shown(x)
    findings = []
    for j, t in enumerate(bundle.tasks):
        m, th = bundle.meta["metrics"][t], bundle.meta["thresholds"][t]
        # A task without validation above chance has no threshold: no reading either way (None), "validated" false.
        findings.append({"name": t, "probability": float(out.probs[0, j]), "threshold": th["threshold"],
                         "validated": th["validated"],
                         "above_threshold": bool(out.flags[0, j]) if th["validated"] else None,
                         "test_auroc": m["test_auroc"],
                         "test_auroc_ci": m["test_auroc_ci"], "test_sensitivity": th.get("test_sensitivity"),
                         "test_specificity": th.get("test_specificity")})
    if out.saliency == "attention":  # one map for every finding: drawn once
        drawn = png_url(overlay(shown, out.cams[0, 0]))
        saliency = {t: drawn for t in bundle.tasks}
    else:
        saliency = {t: png_url(overlay(shown, out.cams[0, j])) for j, t in enumerate(bundle.tasks)}
    result = {"notice": NOTICE, "findings": findings, "image": png_url(shown), "saliency": saliency,
              "saliency_method": SALIENCY_TEXT[out.saliency],
              "threshold_rule": bundle.meta["threshold_rule"],
              "model": {"name": bundle.meta["encoder"]["name"], "protocol": bundle.meta["protocol"],
                        "view": bundle.meta["view"], "arch": bundle.meta["encoder"]["arch"],
                        "vit_features": bundle.vit_features}, "neighbours": []}
    if neighbours is not None:
        result["neighbours"] = [{"key": n["key"], "similarity": n["similarity"], "labels": n["labels"],
                                 "image": data_url(n["jpeg"], "image/jpeg")}
                                for n in neighbours.query(out.features[0], k)]
    return result
