# Grayroute's container image: `docker build -t grayroute .`
#
# Runs as an unprivileged user (uid 10001) and writes nothing outside the state
# directory it is given (--state-dir, a volume), so the root file system can be
# read-only. deploy/kubernetes/ runs it that way.

FROM python:3.11-slim-bookworm AS build
# gcc: the hot path is compiled with mypyc (setup.py; the image has Python's headers).
# Only this stage has it: the image below gets the built package, no compiler.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY router ./router
COPY lua_compat ./lua_compat
# Dependencies as wheels only (uvloop, httptools, lupa and orjson all publish them).
RUN pip install --no-cache-dir --only-binary=:all: --prefix=/install . \
    && python -m compileall -q /install \
    && PYTHONPATH=$(echo /install/lib/python3.*/site-packages) \
       python -c 'from router.native import build_info as b; print(b()); assert b().kind == "compiled"'

FROM python:3.11-slim-bookworm
COPY --from=build /install /usr/local
RUN groupadd --system --gid 10001 grayroute \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin grayroute \
    && mkdir -p /var/lib/grayroute /etc/grayroute \
    && chown 10001:10001 /var/lib/grayroute
# No .pyc writes at run time (the root file system is read-only), unbuffered logs.
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /var/lib/grayroute
EXPOSE 8080 9090
ENTRYPOINT ["grayroute"]
CMD ["serve", "/etc/grayroute/rules.yaml", "--listen", "0.0.0.0:8080", \
     "--admin", "127.0.0.1:9090", "--state-dir", "/var/lib/grayroute"]
