#!/bin/bash
# The start-up check of a session's network. paude-launch runs it as the agent user inside the
# agent container after the container starts and before the agent does (the agent waits for
# /run/paude/ready), and refuses the session if it prints a `leak` or `unreachable` line.
# It uses only bash and coreutils, which every agent image has.
#
# Arguments: SELF PROXY PORT ROUTE NAME ADDRESS...
#   SELF     the agent's own address          PROXY, PORT  where the proxy listens
#   ROUTE    the one route allowed, as /proc/net/route writes it: DEST/MASK in hex
#   NAME     a name the engine's own DNS server would answer at once (the container's name)
#   ADDRESS  the addresses of the agent's subnet to sweep
#
# Output: one line per finding, then `paude-netcheck done`:
#   leak ipv6 DEV ADDR          the agent has an IPv6 address (link-local reaches the host)
#   leak route DEV DEST GW MASK a route other than the agent's own subnet
#   leak dns-udp ADDR           something answered a DNS query over UDP
#   leak dns-tcp ADDR           something accepts TCP connections on port 53
#   leak host ADDR              an address of the subnet other than the proxy answers ARP
#   unreachable proxy ADDR:PORT the proxy does not answer, so the check proves nothing
exec 2>/dev/null
self=$1 proxy=$2 port=$3 route=$4 name=$5
shift 5

# A DNS query of type A for $1, as a printf format: id, recursion desired, one question.
query() {
  local q='\x70\x61\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00' label IFS=.
  for label in $1; do q+=$(printf '\\x%02x' "${#label}")$label; done
  printf '%s\\x00\\x00\\x01\\x00\\x01' "$q"
}

# IPv6: with IPv6 off in the agent's namespace the kernel lists no address at all.
if [ -r /proc/net/if_inet6 ]; then
  while read -r addr _ _ _ _ dev; do
    [ "$dev" = lo ] && [ "$addr" = 00000000000000000000000000000001 ] && continue
    echo "leak ipv6 $dev $addr"
  done < /proc/net/if_inet6
fi

# Routes: only the agent's own subnet.
{
  read -r _
  while read -r dev dest gw _ _ _ _ mask _; do
    [ "$dest/$mask" = "$route" ] || echo "leak route $dev $dest $gw $mask"
  done
} < /proc/net/route

# DNS over UDP: one query for a name no server may know and one for the container's own name
# (which an engine's DNS server answers without asking anyone) to every resolver named in
# resolv.conf and to every address of the subnet. Sending also makes the kernel resolve each
# address of the subnet, so the ARP table below lists every address that exists.
nameservers=$(awk '$1 == "nameserver" {print $2}' /etc/resolv.conf)
canary=$(query paude-netcheck.invalid)
own=$(query "$name")
declare -A udp
for a in $nameservers "$@"; do
  [ "$a" = "$self" ] && continue
  [ -n "${udp[$a]:-}" ] && continue
  exec {fd}<>"/dev/udp/$a/53" || continue
  printf "$canary" >&"$fd"
  printf "$own" >&"$fd"
  udp[$a]=$fd
done
sleep 0.5
for a in "${!udp[@]}"; do
  fd=${udp[$a]}
  # A refused port reads as an error; only a reply reads as data.
  if read -t 0 -u "$fd" && read -r -t 0.2 -N 2 -u "$fd" _; then
    echo "leak dns-udp $a"
  fi
  exec {fd}>&-
done

# Which addresses of the subnet exist: complete entries of the ARP table.
present=()
while read -r ip _ flags _; do
  [ "$flags" = 0x2 ] && present+=("$ip")
done < /proc/net/arp

# DNS over TCP, at every address that exists and every resolver off the subnet.
declare -A swept
for a in "$@"; do swept[$a]=1; done
tcp=("${present[@]}")
for a in $nameservers; do [ -n "${swept[$a]:-}" ] || tcp+=("$a"); done
for a in "${tcp[@]}"; do
  [ "$a" = "$self" ] && continue
  timeout 1 bash -c "exec 3<>/dev/tcp/$a/53" && echo "leak dns-tcp $a"
done

# Nothing but the proxy may exist on the subnet: an address the host holds lets the agent reach
# every service the host runs on all addresses.
for a in "${present[@]}"; do
  [ "$a" = "$self" ] || [ "$a" = "$proxy" ] || echo "leak host $a"
done

timeout 2 bash -c "exec 3<>/dev/tcp/$proxy/$port" || echo "unreachable proxy $proxy:$port"
echo "paude-netcheck done"
