#!/usr/bin/env bash
# Install (if missing), start (if stopped) and wait for the servers conveyor's tests talk to.
#
# Usage:
#   scripts/services.sh ensure SERVICE...   install + start + wait, then check each answers
#   scripts/services.sh status [SERVICE...] say which are up (exit 1 if any is down)
#   scripts/services.sh list                the services this script knows
#
# Services and where they answer (the defaults of the CONVEYOR_TEST_<SERVICE>_URL variables):
#   postgres   127.0.0.1:5432   trust auth for 127.0.0.1, database "test"
#   mariadb    127.0.0.1:3306   root with an empty password over TCP, database "test"
#   redis      127.0.0.1:6379   nothing kept on disk
#   rabbitmq   127.0.0.1:5672   guest/guest
#   memcached  127.0.0.1:11211
#   mongodb    127.0.0.1:27017  SecantusDB, a MongoDB-protocol test server (never a dependency
#                               of conveyor itself; GPL-2.0, installed in its own venv)
#
# Installing needs root (apt-get); `apt-get update` runs once, before the first install.
# Every wait is bounded (SERVICE_WAIT_SECONDS, default 60). Daemons are started with their
# standard streams sent to a log file, never inherited: a daemon holding the caller's stdout
# would keep `make test | tee` (or CI's log pipe) open forever.
set -euo pipefail

WAIT_SECONDS=${SERVICE_WAIT_SECONDS:-60}
LOG_DIR=${CONVEYOR_SERVICES_LOG_DIR:-/var/log/conveyor}
MONGO_VENV=${CONVEYOR_MONGO_TEST_VENV:-/opt/mongo-test}
# The server's own dependencies are pinned too, by scripts/mongo-test-server.txt, which
# `make lock` writes from this line (scripts/lock.py reads it).
SECANTUS_SPEC='SecantusDB==0.7.0b3'
SECANTUS_LOCK=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/mongo-test-server.txt
HOST=127.0.0.1
APT_UPDATED=0
STARTED=0  # set when this run started the current service

KNOWN="postgres mariadb redis rabbitmq memcached mongodb"

say() { printf 'services: %s\n' "$*"; }
die() { printf 'services: ERROR: %s\n' "$*" >&2; exit 1; }

port_of() {
    case "$1" in
        postgres) echo 5432 ;;
        mariadb) echo 3306 ;;
        redis) echo 6379 ;;
        rabbitmq) echo 5672 ;;
        memcached) echo 11211 ;;
        mongodb) echo 27017 ;;
        *) die "unknown service '$1' (known: $KNOWN)" ;;
    esac
}

# True when something accepts TCP connections on 127.0.0.1:PORT (bash's /dev/tcp, 2 s cap).
port_open() {
    timeout 2 bash -c "exec 3<>/dev/tcp/$HOST/$1" 2>/dev/null
}

# wait_port NAME PORT: poll until the port opens or WAIT_SECONDS pass.
wait_port() {
    local name=$1 port=$2 start=$SECONDS
    while ! port_open "$port"; do
        if (( SECONDS - start >= WAIT_SECONDS )); then
            die "$name did not open $HOST:$port within ${WAIT_SECONDS}s (logs: $LOG_DIR, /var/log)"
        fi
        sleep 0.5
    done
    if (( STARTED )); then
        say "$name: answering on $HOST:$port after $((SECONDS - start))s"
    fi
}

# retry_until NAME CMD...: run CMD until it succeeds or WAIT_SECONDS pass (a port can open
# before the server accepts logins, e.g. PostgreSQL during recovery).
retry_until() {
    local name=$1 start=$SECONDS
    shift
    until "$@" >/dev/null 2>&1; do
        if (( SECONDS - start >= WAIT_SECONDS )); then
            "$@" || true
            die "$name: '$*' still failing after ${WAIT_SECONDS}s"
        fi
        sleep 0.5
    done
}

need_root() {
    [[ $(id -u) == 0 ]] || die "$1 needs root (run as root or install it yourself)"
}

apt_install() {
    need_root "installing $*"
    export DEBIAN_FRONTEND=noninteractive
    if (( APT_UPDATED == 0 )); then
        say "apt-get update"
        apt-get update -qq >/dev/null
        APT_UPDATED=1
    fi
    say "apt-get install $*"
    # Some packages' maintainer scripts start their daemon; keep it off our stdout too.
    apt-get install -y -qq --no-install-recommends "$@" </dev/null >>"$LOG_DIR/apt.log" 2>&1 \
        || die "apt-get install $* failed (see $LOG_DIR/apt.log)"
}

# start_logged NAME CMD...: run CMD detached with all streams to $LOG_DIR/NAME.log.
start_logged() {
    local name=$1
    shift
    say "$name: starting: $*"
    STARTED=1
    setsid "$@" </dev/null >>"$LOG_DIR/$name.log" 2>&1 || die "$name: start failed (see $LOG_DIR/$name.log)"
}

# ---------------------------------------------------------------- postgres
pg_version() { ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1; }

pg_sql() { runuser -u postgres -- psql -X -q -tA -d postgres -c "$1"; }

pg_tcp_ok() { psql -X -q -h "$HOST" -p 5432 -U postgres -d postgres -tAc 'SELECT 1' >/dev/null 2>&1; }

ensure_postgres() {
    if ! command -v pg_ctlcluster >/dev/null || [[ -z $(pg_version) ]]; then
        apt_install postgresql
    fi
    local version
    version=$(pg_version)
    [[ -n $version ]] || die "postgres: no cluster under /etc/postgresql after install"
    if ! port_open 5432; then
        start_logged postgres pg_ctlcluster --skip-systemctl-redirect "$version" main start
    fi
    wait_port postgres 5432
    retry_until postgres pg_sql 'SELECT 1'
    if ! pg_tcp_ok; then
        # Debian's default asks for a password over TCP; tests connect as postgres with none.
        local hba
        hba=$(pg_sql 'SHOW hba_file')
        say "postgres: allowing trust auth from 127.0.0.1 and ::1 in $hba"
        sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
        pg_sql 'SELECT pg_reload_conf()' >/dev/null
        retry_until postgres pg_tcp_ok
    fi
    if [[ $(pg_sql "SELECT 1 FROM pg_database WHERE datname = 'test'") != 1 ]]; then
        say "postgres: creating database test"
        pg_sql 'CREATE DATABASE test' >/dev/null
    fi
    say "postgres: ready (postgresql+psycopg://postgres@$HOST:5432/test)"
}

# ---------------------------------------------------------------- mariadb
maria_tcp_ok() { mariadb -h "$HOST" -P 3306 -u root --connect-timeout=3 -e 'SELECT 1' >/dev/null 2>&1; }

ensure_mariadb() {
    if [[ ! -x /usr/sbin/mariadbd ]]; then
        apt_install mariadb-server
    fi
    if ! port_open 3306; then
        # The socket directory lives on tmpfs; systemd would create it, nothing else does.
        install -d -o mysql -g mysql /run/mysqld
        start_logged mariadb start-stop-daemon --start --oknodo --background \
            --exec /usr/sbin/mariadbd
    fi
    wait_port mariadb 3306
    retry_until mariadb mariadb -u root -e 'SELECT 1'
    if ! maria_tcp_ok; then
        # Debian's root@localhost logs in through the unix socket only; tests use TCP.
        say "mariadb: granting root@127.0.0.1 (and root@localhost) an empty password over TCP"
        mariadb -u root <<'SQL'
CREATE USER IF NOT EXISTS 'root'@'127.0.0.1' IDENTIFIED BY '';
GRANT ALL PRIVILEGES ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION;
ALTER USER 'root'@'localhost' IDENTIFIED VIA mysql_native_password USING PASSWORD('') OR unix_socket;
FLUSH PRIVILEGES;
SQL
        retry_until mariadb maria_tcp_ok
    fi
    mariadb -u root -e 'CREATE DATABASE IF NOT EXISTS test'
    say "mariadb: ready (mysql+pymysql://root@$HOST:3306/test)"
}

# ---------------------------------------------------------------- redis
ensure_redis() {
    # redis-sentinel too: the failover tests start their own sentinels on free ports.
    if ! command -v redis-server >/dev/null || ! command -v redis-sentinel >/dev/null; then
        apt_install redis-server redis-sentinel redis-tools
    fi
    if ! port_open 6379; then
        mkdir -p /var/lib/redis /var/log/redis
        start_logged redis redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 \
            --save "" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
    fi
    wait_port redis 6379
    say "redis: ready (redis://$HOST:6379/0)"
}

# ---------------------------------------------------------------- rabbitmq
ensure_rabbitmq() {
    command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
    if ! port_open 5672; then
        start_logged rabbitmq rabbitmq-server -detached
    fi
    wait_port rabbitmq 5672
    say "rabbitmq: ready (amqp://guest:***@$HOST:5672//)"
}

# ---------------------------------------------------------------- memcached
ensure_memcached() {
    command -v memcached >/dev/null || apt_install memcached
    if ! port_open 11211; then
        start_logged memcached memcached -d -u root -l "$HOST" -p 11211 -m 512
    fi
    wait_port memcached 11211
    say "memcached: ready (cache+memcached://$HOST:11211/)"
}

# ---------------------------------------------------------------- mongodb
ensure_mongodb() {
    local server=$MONGO_VENV/bin/secantusd-py
    if [[ ! -x $server ]]; then
        need_root "installing $SECANTUS_SPEC into $MONGO_VENV"
        say "mongodb: installing $SECANTUS_SPEC into $MONGO_VENV (its own venv: it is GPL-2.0)"
        python3 -m venv "$MONGO_VENV"
        "$MONGO_VENV/bin/pip" install -q --constraint "$SECANTUS_LOCK" "$SECANTUS_SPEC" </dev/null >>"$LOG_DIR/mongodb-install.log" 2>&1 \
            || die "mongodb: pip install $SECANTUS_SPEC failed (see $LOG_DIR/mongodb-install.log)"
    fi
    # SecantusDB keeps everything in memory and slows down as its change log grows (about
    # 450 -> 80 writes/s after 30,000 writes), so each run gets a fresh one. Only our own
    # test server is restarted; a real mongod on the port is left alone.
    if port_open 27017 && pgrep -f "secantusd-py .*--port 27017" >/dev/null; then
        say "mongodb: restarting the in-memory SecantusDB for a fresh, fast server"
        pkill -f "secantusd-py .*--port 27017" || true
        for _ in $(seq 1 100); do port_open 27017 || break; sleep 0.1; done
        port_open 27017 && { pkill -9 -f "secantusd-py .*--port 27017" || true; sleep 1; }
    fi
    if ! port_open 27017; then
        # nohup + setsid + '&': the server does not daemonize itself. --standalone: without
        # the replica-set advertisement writes stay fast (conveyor needs no change streams).
        say "mongodb: starting $server on $HOST:27017 (in memory, standalone)"
        STARTED=1
        setsid nohup "$server" --host "$HOST" --port 27017 --storage-path :memory: \
            --standalone --log-level WARNING </dev/null >>"$LOG_DIR/mongodb.log" 2>&1 &
        disown
    fi
    wait_port mongodb 27017
    say "mongodb: ready (mongodb://$HOST:27017/)"
}

# ---------------------------------------------------------------- commands
cmd_ensure() {
    (( $# > 0 )) || die "ensure needs at least one service (known: $KNOWN)"
    mkdir -p "$LOG_DIR" 2>/dev/null || LOG_DIR=${TMPDIR:-/tmp}/conveyor-services
    mkdir -p "$LOG_DIR"
    local service port
    for service in "$@"; do
        port=$(port_of "$service")
        STARTED=0
        if port_open "$port"; then
            say "$service: already running on $HOST:$port"
        fi
        "ensure_$service"
    done
}

cmd_status() {
    local service port down=0
    (( $# > 0 )) || set -- $KNOWN
    for service in "$@"; do
        port=$(port_of "$service")
        if port_open "$port"; then
            say "$service: up on $HOST:$port"
        else
            say "$service: DOWN on $HOST:$port"
            down=1
        fi
    done
    return "$down"
}

main() {
    local command=${1:-}
    shift || true
    case "$command" in
        ensure) cmd_ensure "$@" ;;
        status) cmd_status "$@" ;;
        list) echo "$KNOWN" ;;
        *)
            sed -n '2,9p' "$0" >&2
            exit 2
            ;;
    esac
}

main "$@"
