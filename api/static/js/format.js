// Figures as a person reads them (the CLI's `modelfleet ps` uses the same units).

export function bytes(n) {
  if (n === null || n === undefined) return "–";
  let size = n;
  for (const unit of ["B", "KiB", "MiB", "GiB", "TiB"]) {
    if (size < 1024 || unit === "TiB") return unit === "B" ? `${size} B` : `${size.toFixed(1)} ${unit}`;
    size /= 1024;
  }
  return `${n} B`;
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "–";
  const s = Math.max(0, Math.floor(seconds));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
  return `${Math.floor(s / 86400)}d ${String(Math.floor((s % 86400) / 3600)).padStart(2, "0")}h`;
}

export function since(iso, now = Date.now()) {
  if (!iso) return null;
  return (now - Date.parse(iso)) / 1000;
}

export function ago(iso, now = Date.now()) {
  const s = since(iso, now);
  return s === null ? "never" : `${duration(s)} ago`;
}

export function clock(iso) {
  if (!iso) return "";
  return new Date(iso).toLocaleTimeString([], { hour12: false });
}

export const shortFingerprint = (fp) => fp.slice(0, 12);
